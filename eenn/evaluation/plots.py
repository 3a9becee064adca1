"""The comparison plots: accuracy vs cost, exit distributions, confusion matrices, reliability
diagrams and risk-cost curves.

Figures are made without pyplot, so writing them needs no display and leaves a notebook's own
backend alone; :func:`accuracy_vs_cost` draws on any Axes, a notebook's included. The ``plot_*``
functions return (name, figure) pairs; :func:`save_png` writes one where the caller says.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from eenn.evaluation.calibration import expected_calibration_error, reliability
from eenn.evaluation.compare import Comparison, Model, per_exit, policy_label, temperatures
from eenn.policies import budget_ceiling, policy_class
from eenn.utils.io import atomic_path

UNIT_LABEL = {
    "flops": "average FLOPs per sample",
    "macs": "average MACs per sample",
    "latency_ms": "average latency per sample (ms)",
    "params": "average parameters touched",
}


def _scale(unit: str, values: list[float]) -> tuple[list[float], str]:
    if unit in ("flops", "macs", "params") and values and max(values) > 1e6:
        return [v / 1e6 for v in values], f"{UNIT_LABEL[unit]} (millions)"
    return values, UNIT_LABEL.get(unit, unit)


def save_png(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def accuracy_vs_cost(comp: Comparison, model: Model, unit: str, ax: Axes) -> None:
    """Budgeted batch classification (MSDNet's protocol): test accuracy against realised average
    cost, one curve per policy; per-exit static points (anytime) and the oracle ceiling."""
    rows = [r for r in comp.rows if r["model"] == model.name and r["cost_unit"] == unit and not per_exit(r)]
    by_policy: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_policy[policy_label(r)].append(r)
    all_costs = [r["test_avg_cost"] for r in rows] + [p["avg_cost"] for p in model.static_points(unit)]
    _, label = _scale(unit, all_costs)
    div = 1e6 if "millions" in label else 1.0
    for policy, pts in sorted(by_policy.items()):
        pts = sorted(pts, key=lambda r: r["test_avg_cost"])
        ceiling = not policy_class(pts[0]["policy"]).online  # it reads the labels: a ceiling, not a policy
        style = {"linestyle": "--", "color": "black", "marker": None} if ceiling else {"marker": "o"}
        ax.plot([p["test_avg_cost"] / div for p in pts], [100 * p["test_accuracy"] for p in pts], label=policy, **style)
    static = model.static_points(unit)
    ax.scatter(
        [p["avg_cost"] / div for p in static],
        [100 * p["accuracy"] for p in static],
        marker="*",
        s=160,
        color="crimson",
        zorder=5,
        label="static (each exit)",
    )
    if budget_ceiling() not in by_policy:
        oracle = model.oracle_curve(unit)
        ax.plot(
            [p["avg_cost"] / div for p in oracle],
            [100 * p["accuracy"] for p in oracle],
            linestyle=":",
            color="grey",
            label="oracle ceiling",
        )
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model.name} [{model.training}]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_accuracy_vs_cost(comp: Comparison) -> list[tuple[str, Figure]]:
    """One figure per cost unit (FLOPs, and milliseconds where runs used measured latency)."""
    figures = []
    for unit in sorted({r["cost_unit"] for r in comp.rows}):
        models = [
            m for m in comp.models.values() if any(r["model"] == m.name and r["cost_unit"] == unit for r in comp.rows)
        ]
        if not models:
            continue
        fig = Figure(figsize=(6.5 * len(models), 4.5))
        axes = fig.subplots(1, len(models), squeeze=False)
        for ax, m in zip(axes[0], models):
            accuracy_vs_cost(comp, m, unit, ax)
        figures.append((f"accuracy_vs_cost_{unit}", fig))
    return figures


def plot_seed_groups(comp: Comparison) -> list[tuple[str, Figure]]:
    """Where a comparison has groups of seeds: per cost unit, each group's mean test accuracy over
    its seeds against its mean realised cost, one line per policy, the 95 % CI as a band (a group
    of one seed is drawn without one and says so in the legend); with a baseline, a second panel
    of the paired differences to it with their CIs."""
    figures = []
    for unit in sorted({g.cost_unit for g in comp.group_stats}):
        stats = [g for g in comp.group_stats if g.cost_unit == unit]
        if not any(g.accuracy.n > 1 for g in stats):
            continue  # no seeds to speak of: the per-model plot says it all
        diffs = [g for g in stats if g.difference is not None]
        fig = Figure(figsize=(13 if diffs else 7, 4.8))
        axes = fig.subplots(1, 2 if diffs else 1, squeeze=False)[0]
        _, label = _scale(unit, [g.mean_test_avg_cost for g in stats])
        div = 1e6 if "millions" in label else 1.0
        curves: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for g in stats:
            curves[(g.group, g.policy)].append(g)
        for (group, policy), pts in sorted(curves.items()):
            pts.sort(key=lambda g: g.requested_fraction)
            n = sorted({g.accuracy.n for g in pts})
            tag = "1 seed: no spread" if n == [1] else f"{'/'.join(map(str, n))} seeds"
            x = [g.mean_test_avg_cost / div for g in pts]
            (line,) = axes[0].plot(
                x, [100 * g.accuracy.mean for g in pts], marker="o", label=f"{group} · {policy} ({tag})"
            )
            band = [(g.accuracy.ci_low, g.accuracy.ci_high) for g in pts]
            if all(lo is not None for lo, _ in band):
                axes[0].fill_between(
                    x, [100 * lo for lo, _ in band], [100 * hi for _, hi in band], color=line.get_color(), alpha=0.15
                )
            dpts = [g for g in pts if g.difference is not None]
            if diffs and dpts:
                dx = [g.requested_fraction for g in dpts]
                (line,) = axes[1].plot(
                    dx, [100 * g.difference.mean for g in dpts], marker="o", label=f"{group} · {policy}"
                )
                if all(g.difference.ci_low is not None for g in dpts):
                    axes[1].fill_between(
                        dx,
                        [100 * g.difference.ci_low for g in dpts],
                        [100 * g.difference.ci_high for g in dpts],
                        color=line.get_color(),
                        alpha=0.15,
                    )
        axes[0].set(xlabel=label, ylabel="test accuracy (%)", title="seed groups: mean and 95 % CI over seeds")
        if diffs:
            axes[1].axhline(0, color="black", lw=0.8)
            axes[1].set(
                xlabel="budget (fraction of the full cost)",
                ylabel=f"test accuracy - {comp.baseline} (points)",
                title="paired difference to the baseline (by seed), 95 % CI",
            )
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        figures.append((f"seed_groups_{unit}", fig))
    return figures


def plot_exit_distributions(comp: Comparison) -> list[tuple[str, Figure]]:
    """Per policy, the share of test samples leaving at each exit, at each budget (stacked bars);
    none when no policy ran at a budget."""
    rows = [r for r in comp.rows if not per_exit(r)]
    if not rows:
        return []
    keys = sorted({(r["model"], policy_label(r), r["cost_unit"]) for r in rows})
    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig = Figure(figsize=(5 * cols, 3.2 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, (model, policy, unit) in zip(axes.flat, keys):
        pts = sorted(
            (r for r in rows if (r["model"], policy_label(r), r["cost_unit"]) == (model, policy, unit)),
            key=lambda r: r["budget_fraction"],
        )
        fractions = [json.loads(r["test_exit_fractions"]) for r in pts]
        x = range(len(pts))  # one bar per budget, labelled by it (numeric positions: no category axis)
        bottom = [0.0] * len(pts)
        for k in range(len(fractions[0])):
            vals = [f[k] for f in fractions]
            ax.bar(x, vals, bottom=bottom, label=f"exit {k}")
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(x, [f"{r['budget_fraction']:.2f}" for r in pts])
        ax.set_title(f"{policy} ({model}, {unit})", fontsize=9)
        ax.set_xlabel("budget (fraction of full cost)")
        ax.set_ylabel("share of samples")
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return [("exit_distributions", fig)]


def crossing_point(comp: Comparison, model: Model) -> dict[str, Any] | None:
    """DEEx's crossing point: the cheapest ``deex`` run whose edge exits answer at least as
    accurately as the backbone exit does for the samples it receives."""
    fits = sorted(
        (
            f
            for f in comp.fits
            if policy_class(f["policy"]).has_p_d_curve
            and Path(f["run"]).exists()
            and any(r["run"] == f["run"] and r["model"] == model.name for r in comp.rows)
        ),
        key=lambda f: f["budget"],
    )
    for f in fits:
        acc, frac = f["test"]["exit_accuracy"], f["test"]["exit_fractions"]
        edge = [(a, w) for a, w in zip(acc[:-1], frac[:-1]) if a is not None and w > 0]
        if not edge or acc[-1] is None:
            continue
        edge_acc = sum(a * w for a, w in edge) / sum(w for _, w in edge)
        if edge_acc >= acc[-1]:
            return f
    return None


def plot_confusions(comp: Comparison) -> list[tuple[str, Figure]]:
    """One figure of confusion matrices per model (:func:`confusion_figure`)."""
    return [(f"confusion_{m.name}", confusion_figure(comp, m)) for m in comp.models.values()]


def confusion_figure(comp: Comparison, model: Model) -> Figure:
    """DEEx Fig. 6/7: confusion matrices with every sample at the first exit, at the last exit,
    and at the crossing point of the deex policy (when a deex sweep is present)."""
    panels = [
        (f"all at {model.test.exit_names[0]}", model.confusion(0)),
        (f"all at {model.test.exit_names[-1]}", model.confusion(model.test.num_exits - 1)),
    ]
    cross = crossing_point(comp, model)
    if cross is not None:
        panels.append(
            (f"{cross['policy']} crossing point (budget {cross['budget_fraction']:.2f})", cross["test"]["confusion"])
        )
    c = model.test.num_classes
    fig = Figure(figsize=(4.2 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, cm) in zip(axes[0], panels):
        m = np.asarray(cm, dtype=float)
        m = m / np.clip(m.sum(1, keepdims=True), 1, None)
        ax.imshow(m, vmin=0, vmax=1, cmap="Blues")
        ax.set_title(title, fontsize=9)
        names = model.test.class_names
        ax.set_xticks(range(c), names if c <= 12 else [""] * c, rotation=90, fontsize=7)
        ax.set_yticks(range(c), names if c <= 12 else [""] * c, fontsize=7)
        if c <= 12:
            for i in range(c):
                ax.text(i, i, f"{m[i, i]:.2f}", ha="center", va="center", fontsize=6, color="black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    fig.tight_layout()
    return fig


def plot_reliability(comp: Comparison) -> list[tuple[str, Figure]]:
    """Per model, one reliability diagram per exit on the test predictions: accuracy against mean
    confidence per confidence bin, with the diagonal of perfect calibration; before and, where a
    fit calibrated (calibrate=true), after temperature scaling, each with its ECE."""
    figures = []
    for model in comp.models.values():
        T = temperatures(comp, model)
        K = model.test.num_exits
        fig = Figure(figsize=(3.6 * K, 3.6))
        axes = fig.subplots(1, K, squeeze=False)
        for k, ax in enumerate(axes[0]):
            z = model.test.logits[:, k]
            versions = [("uncalibrated", z)] + ([] if T is None else [(f"T = {float(T[k]):.2f}", z / T[k])])
            for label, logits in versions:
                r = reliability(logits, model.test.labels)
                pts = [(c, a) for n, c, a in zip(r["count"], r["confidence"], r["accuracy"]) if n]
                ece = expected_calibration_error(logits, model.test.labels)
                ax.plot([c for c, _ in pts], [a for _, a in pts], marker="o", label=f"{label} (ECE {ece:.3f})")
            ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_title(f"{model.name}: {model.test.exit_names[k]}", fontsize=9)
            ax.set_xlabel("confidence (max probability)")
            ax.set_ylabel("test accuracy")
            ax.legend(fontsize=7)
        fig.tight_layout()
        figures.append((f"reliability_{model.name}", fig))
    return figures


def plot_risk_curves(points: list[dict[str, Any]]) -> list[tuple[str, Figure]]:
    """Per model and loss of the risk-controlled fits (:func:`eenn.evaluation.compare.risk_points`):
    the realised test risk against epsilon with the diagonal it must stay under, and the cost
    saved at each epsilon; Learn then Test beside the uncertified baseline."""
    keys = sorted({(p["model"], p["loss"], p["calibrated"]) for p in points})
    figures = []
    for model, loss, calibrated in keys:
        pts = sorted(
            (p for p in points if (p["model"], p["loss"], p["calibrated"]) == (model, loss, calibrated)),
            key=lambda p: p["epsilon"],
        )
        eps = [100 * p["epsilon"] for p in pts]
        fig = Figure(figsize=(10, 4))
        risk_ax, cost_ax = fig.subplots(1, 2)
        risk_ax.plot(
            eps, [100 * p["test_risk"] for p in pts], marker="o", label=f"Learn then Test (δ = {pts[0]['delta']:g})"
        )
        risk_ax.plot(
            eps,
            [100 * p["uncertified_test_risk"] for p in pts],
            marker="s",
            label="maxprob at the validation risk (no guarantee)",
        )
        top = max(eps)
        risk_ax.plot([0, top], [0, top], linestyle="--", color="grey", label="risk = ε")
        risk_ax.set_xlabel("ε (%)")
        risk_ax.set_ylabel(f"realised test {loss} (%)")
        cost_ax.plot(eps, [100 * p["cost_saved"] for p in pts], marker="o", label="Learn then Test")
        cost_ax.plot(
            eps, [100 * p["uncertified_cost_saved"] for p in pts], marker="s", label="maxprob at the validation risk"
        )
        cost_ax.set_xlabel("ε (%)")
        cost_ax.set_ylabel("test cost saved (% of the full cost)")
        for ax in (risk_ax, cost_ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        suffix = ", calibrated" if calibrated else ""
        fig.suptitle(f"{model}: risk-cost ({loss}{suffix})", fontsize=10)
        fig.tight_layout()
        figures.append((f"risk_cost_{model}_{loss}{'_calibrated' if calibrated else ''}", fig))
    return figures
