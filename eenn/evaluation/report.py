"""A self-contained HTML report: the interactive accuracy-vs-cost figure (plotly.js inline), plots
embedded as base64 PNGs, tables inline, no external links."""

from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from pathlib import Path

from eenn.evaluation.compare import Comparison, GroupStat, per_exit, policy_label
from eenn.evaluation.interactive import interactive_html
from eenn.evaluation.stats import NO_DIFFERENCE, NO_SPREAD
from eenn.utils.io import atomic_path

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td.l, th.l { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.fail { color: #a00; }
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[object]], left: int = 1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(h)}</th>' for i, h in enumerate(header))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"l" if i < left else ""}">{html.escape(str(v))}</td>' for i, v in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


def accuracy_table(comp: Comparison) -> tuple[list[str], list[list[object]]]:
    """Test accuracy (%) per (model, policy, unit) row and requested budget-fraction column
    (runs of a policy compared per exit, static's, are in the per-exit tables instead); fits of a
    policy that differ in their settings each get a row (:func:`~eenn.evaluation.compare.distinguish`)."""
    rows = [r for r in comp.rows if not per_exit(r)]
    fractions = sorted({round(r["requested_fraction"], 3) for r in rows})
    cells: dict[tuple[str, str, str], dict[float, str]] = defaultdict(dict)
    for r in rows:
        cells[(r["model"], policy_label(r), r["cost_unit"])][round(r["requested_fraction"], 3)] = (
            f"{100 * r['test_accuracy']:.2f}"
        )
    header = ["model", "policy", "unit", *[f"{f:.2f}" for f in fractions]]
    rows = [[m, p, u, *[c.get(f, "") for f in fractions]] for (m, p, u), c in sorted(cells.items())]
    return header, rows


def _accuracy_cell(g: GroupStat) -> str:
    a = g.accuracy
    if a.ci_low is None or a.ci_high is None:
        return f"{100 * a.mean:.2f} ({NO_SPREAD})"
    return f"{100 * a.mean:.2f} [{100 * a.ci_low:.2f}, {100 * a.ci_high:.2f}] n={a.n}"


def _difference_cell(g: GroupStat) -> str:
    d = g.difference
    if d is None:
        return ""
    if d.ci_low is None or d.ci_high is None:
        return f"{100 * d.mean:+.2f} ({NO_SPREAD})"
    text = f"{100 * d.mean:+.2f} [{100 * d.ci_low:+.2f}, {100 * d.ci_high:+.2f}] p={d.p_t:.3g}"
    if d.p_sign_flip is not None:
        text += f" (sign-flip {d.p_sign_flip:.3g})"
    if d.verdict == NO_DIFFERENCE:
        text += f": {NO_DIFFERENCE}"
        if d.detectable is not None:
            text += f" (could have seen ±{100 * d.detectable:.2f})"
    return text


def seed_table(comp: Comparison) -> tuple[list[str], list[list[object]]]:
    """Per seed group, policy and unit, and per budget: the test accuracy's mean and 95 % CI over
    the group's seeds (in %), and, with a baseline, the paired difference to it in points with its
    CI and p-values, "no detectable difference" where the CI holds 0 (with the effect the study
    could have seen), "1 seed: no spread" where there is one seed."""
    fractions = sorted({g.requested_fraction for g in comp.group_stats})
    cells: dict[tuple[str, str, str], dict[float, GroupStat]] = defaultdict(dict)
    for g in comp.group_stats:
        cells[(g.group, g.policy, g.cost_unit)][g.requested_fraction] = g
    header = ["group", "policy", "unit", "seeds", *[f"{f:.2f}" for f in fractions]]
    rows: list[list[object]] = []
    for (group, policy, unit), by_f in sorted(cells.items()):
        seeds = sorted({str(sd) for g in by_f.values() for sd in g.seeds})
        rows.append(
            [group, policy, unit, " ".join(seeds), *[_accuracy_cell(by_f[f]) if f in by_f else "" for f in fractions]]
        )
        if any(g.difference is not None for g in by_f.values()):
            rows.append(
                [
                    group,
                    policy,
                    unit,
                    f"- {comp.baseline}",
                    *[_difference_cell(by_f[f]) if f in by_f else "" for f in fractions],
                ]
            )
    return header, rows


def risk_table(points: list[dict[str, object]]) -> tuple[list[str], list[list[object]]]:
    """The risk-controlled fits (:func:`eenn.evaluation.compare.risk_points`), one row per ε."""
    header = [
        "model",
        "loss",
        "calibrated",
        "ε %",
        "δ",
        "n cal",
        "certified",
        "threshold",
        "test risk %",
        "cost saved %",
        "uncertified threshold",
        "uncertified test risk %",
        "uncertified cost saved %",
    ]
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    thr = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    rows = [
        [
            p["model"],
            p["loss"],
            p["calibrated"],
            pct(p["epsilon"]),
            p["delta"],
            p["calibration_size"],
            p["certified"],
            thr(p["threshold"]),
            pct(p["test_risk"]),
            pct(p["cost_saved"]),
            thr(p["uncertified_threshold"]),
            pct(p["uncertified_test_risk"]),
            pct(p["uncertified_cost_saved"]),
        ]
        for p in points
    ]
    return header, rows


def write_report(
    comp: Comparison,
    images: list[Path],
    out_path: Path,
    risk: list[dict[str, object]] | None = None,
    title: str = "eenn: exit policies compared",
) -> Path:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    parts.append(
        f"<p>{len(comp.rows)} stage-2 runs, policies: {html.escape(', '.join(comp.policies))}; "
        f"models: {html.escape(', '.join(m.name for m in comp.models.values()))}.</p>"
    )
    if comp.failures:
        parts.append("<h2 class='fail'>Missing or failed runs</h2>")
        parts.append(_table(["run", "reason"], [[f["run"], f["reason"]] for f in comp.failures], left=2))
    parts.append("<h2>Stage-1 models: per-exit test accuracy (anytime prediction)</h2>")
    for m in comp.models.values():
        costs = m.test.costs.tolist()
        rows = [
            [n, f"{c / costs[-1]:.3f}", f"{100 * a:.2f}"]
            for n, c, a in zip(m.test.exit_names, costs, m.test.accuracy_per_exit().tolist())
        ]
        parts.append(f"<h3>{html.escape(m.name)} [{html.escape(m.training)}]</h3>")
        parts.append(_table(["exit", "cost (x last exit)", "test accuracy %"], rows))
    parts.append(
        "<h2>Accuracy vs cost (interactive)</h2><p>Hover a point for its numbers; click a legend entry to "
        "hide or show its curve (a seed group's 95 % CI band goes with its mean).</p>"
    )
    parts.append(interactive_html(comp))
    parts.append("<h2>Plots</h2>")
    parts += [_img(p) for p in images]
    header, rows = accuracy_table(comp)
    parts.append("<h2>Test accuracy (%) by budget (fraction of the full cost)</h2>")
    parts.append(_table(header, rows, left=3))
    if comp.group_stats:
        parts.append("<h2>Seeds: test accuracy (%) over each group's seeds, mean [95 % CI]</h2>")
        parts.append(
            "<p>Runs whose configs differ only in their seed form a group. "
            + (
                f"Rows marked “- {html.escape(comp.baseline)}” give each group's paired difference to that "
                "baseline, by seed, in points: mean [95 % t interval], the t-test's p and the exact sign-flip "
                f"test's; where the interval holds 0 the study shows {NO_DIFFERENCE}, and says how large an "
                "effect it could have seen (80 % power)."
                if comp.baseline
                else "Name a baseline (compare.baseline=&lt;group&gt;) for paired differences to it."
            )
            + f" A group of one seed has “{NO_SPREAD}”: it says nothing about the spread.</p>"
        )
        parts.append(_table(*seed_table(comp), left=4))
    if risk:
        parts.append("<h2>Risk control: realised test risk and cost saved at each ε</h2>")
        parts.append(
            "<p>Learn then Test certifies that the loss against the final exit is at most ε with probability "
            "1 - δ; the uncertified baseline takes the same rule at the same empirical risk on validation.</p>"
        )
        parts.append(_table(*risk_table(risk), left=3))
    calibrated = [f for f in comp.fits if f.get("calibration")]
    if calibrated:
        parts.append("<h2>Calibration: test ECE per exit before / after temperature scaling</h2>")
        by_model = {f["model"]: f for f in calibrated}  # a model's fits share their validation set, so their T
        rows = [
            [m, n, f"{t:.3f}", f"{b:.4f}", f"{a:.4f}"]
            for m, f in by_model.items()
            for n, t, b, a in zip(
                f["exit_names"],
                f["calibration"]["temperatures"],
                f["calibration"]["test"]["ece_before"],
                f["calibration"]["test"]["ece_after"],
            )
        ]
        parts.append(_table(["model", "exit", "T", "ECE before", "ECE after"], rows, left=2))
    parts.append("<h2>All runs</h2>")
    run_rows = [
        [
            r["model"],
            policy_label(r),
            r["cost_unit"],
            f"{r['budget_fraction']:.3f}",
            f"{100 * r['val_accuracy']:.2f}",
            f"{100 * r['test_accuracy']:.2f}",
            f"{r['test_avg_cost']:.4g}",
            ", ".join(f"{f:.2f}" for f in json.loads(r["test_exit_fractions"])),
        ]
        for r in comp.rows
    ]
    parts.append(
        _table(
            ["model", "policy", "unit", "budget", "val acc %", "test acc %", "test avg cost", "test exit fractions"],
            run_rows,
            left=3,
        )
    )
    parts.append("</body></html>")
    with atomic_path(out_path) as tmp:
        tmp.write_text("\n".join(parts))
    return out_path
