"""Compare exit policies across budgets: the stage-1 models and the rows of their stage-2 fits,
with the per-exit (anytime) points and the oracle ceiling from the stage-1 test predictions, and
the results table as CSV.

Seeds are an axis of every comparison: models whose training configs differ only in ``seed``
form a group (:func:`group_seeds`), and per group, policy and budget the test accuracy over its
seeds gets a mean, standard deviation and 95 % t interval; with a baseline group, every other
group's paired difference to it (by seed) gets an interval, a t-test and an exact sign-flip test
(:mod:`eenn.evaluation.stats`). A group of one seed is labelled "1 seed: no spread"."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eenn.errors import EENNError
from eenn.evaluation.calibration import temperature_split
from eenn.evaluation.offline import evaluate
from eenn.evaluation.stats import NO_SPREAD, Difference, Summary, paired_difference, summarise
from eenn.policies import ExitPolicy, budget_ceiling, build_policy, policy_class
from eenn.predictions import Predictions
from eenn.utils.io import atomic_path

CSV_COLUMNS = [
    "model",
    "training",
    "policy",
    "settings",
    "requested_fraction",
    "budget_fraction",
    "budget",
    "cost_unit",
    "val_accuracy",
    "test_accuracy",
    "val_avg_cost",
    "test_avg_cost",
    "test_exit_fractions",
    "fit_seconds",
    "run",
    # the seed group's statistics at this row's policy, unit and budget (the same on every seed's row)
    "group",
    "seed",
    "group_n",
    "group_mean",
    "group_std",
    "group_ci_low",
    "group_ci_high",
    # the paired difference of the group to the baseline group (empty without compare.baseline)
    "baseline",
    "diff_n",
    "diff_mean",
    "diff_ci_low",
    "diff_ci_high",
    "diff_p_t",
    "diff_p_sign_flip",
    "verdict",
]
GROUP_CSV_COLUMNS = [
    "group",
    "policy",
    "cost_unit",
    "requested_fraction",
    "seeds",
    "n",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "mean_test_avg_cost",
    "baseline",
    "diff_n",
    "diff_mean",
    "diff_ci_low",
    "diff_ci_high",
    "diff_p_t",
    "diff_p_sign_flip",
    "detectable",
    "verdict",
]
#: config keys that say where and how a run was logged, not what it trained: a group ignores them
NOT_TRAINING = (
    "seed",
    "data.seed",
    "paths",
    "hydra",
    "logger",
    "callbacks",
    "wandb",
    "pipeline",
    "compare",
    "task_name",
    "resume",
    "ckpt_path",
    "force",
    "cost",
    "data.root",
    "data.num_workers",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
)


@dataclass
class Model:
    """A stage-1 run: its name, training stage, and test predictions (for anytime and oracle points)."""

    name: str
    run_dir: Path
    training: str
    test: Predictions
    val: Predictions
    #: the run's resolved config, flattened to dotted keys (empty: unknown, a group of its own)
    config: dict[str, Any] = field(default_factory=dict)
    group: str = ""  # filled by group_seeds()

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    def static_points(self, unit: str) -> list[dict[str, Any]]:
        costs = self.test.costs_in(unit)
        acc = self.test.accuracy_per_exit()
        return [
            {"exit": n, "avg_cost": float(c), "accuracy": float(a)}
            for n, c, a in zip(self.test.exit_names, costs.tolist(), acc.tolist())
        ]

    def oracle_curve(self, unit: str, points: int = 12) -> list[dict[str, Any]]:
        """The best accuracy any exit assignment reaches at each average cost, on the test set."""
        costs = self.test.costs_in(unit)
        curve = []
        for b in torch.linspace(float(costs[0]), float(costs[-1]), points).tolist():
            policy = build_policy(budget_ceiling()).fit(self.test, b, unit)
            s = evaluate(policy, self.test, unit)
            curve.append({"budget": b, "avg_cost": s["avg_cost"], "accuracy": s["accuracy"]})
        return curve

    def confusion(self, exit_index: int) -> list[list[int]]:
        pred = self.test.logits[:, exit_index].argmax(-1)
        c = self.test.num_classes
        return torch.bincount(self.test.labels * c + pred, minlength=c * c).view(c, c).tolist()


@dataclass
class GroupStat:
    """One group's test accuracy at one (policy, unit, budget) over its seeds, and its paired
    difference to the baseline group there (None without a baseline, or for the baseline)."""

    group: str
    policy: str
    cost_unit: str
    requested_fraction: float
    seeds: list[int | None]
    accuracy: Summary
    mean_test_avg_cost: float
    baseline: str | None = None
    difference: Difference | None = None


@dataclass
class Comparison:
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    models: dict[str, Model] = field(default_factory=dict)
    fits: list[dict[str, Any]] = field(default_factory=list)  # every fit run's full metrics
    baseline: str | None = None  # the group every other one is paired with
    group_stats: list[GroupStat] = field(default_factory=list)

    @property
    def policies(self) -> list[str]:
        return sorted({r["policy"] for r in self.rows})


def per_exit(row: dict[str, Any]) -> bool:
    """A results row of a policy compared exit by exit (static's), not over budgets."""
    return policy_class(row["policy"]).per_exit_only


def distinguish(comp: Comparison) -> None:
    """Fill each row's ``settings``: where the fits of one policy on one model and cost unit differ
    (risk's ``epsilon`` swept at one budget, a calibrated and a raw fit, ...), the differing
    settings, ``key=value`` joined by spaces; empty where they agree. A table keyed by policy and
    budget then gives each such fit a row of its own, where it would otherwise show one of them."""
    fits = {f["run"]: f for f in comp.fits}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in comp.rows:
        groups[(r["model"], r["policy"], r["cost_unit"])].append(r)
    for rows in groups.values():
        settings = [
            {**fits[r["run"]].get("hparams", {}), "calibrate": bool(fits[r["run"]].get("calibration"))} for r in rows
        ]
        keys = sorted({k for s in settings for k in s})
        varying = [k for k in keys if len({_text(s.get(k)) for s in settings}) > 1]
        for r, s in zip(rows, settings):
            r["settings"] = " ".join(f"{k}={_text(s.get(k))}" for k in varying)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def policy_label(row: dict[str, Any]) -> str:
    """The policy's name, with the settings that tell its fits apart (:func:`distinguish`)."""
    return f"{row['policy']} ({row['settings']})" if row.get("settings") else row["policy"]


def fit_row(metrics: dict[str, Any], run: Path, model: str, training: str) -> dict[str, Any]:
    """A fit's row of the results table, from its metrics."""
    return {
        "model": model,
        "training": training,
        "policy": metrics["policy"],
        "settings": "",  # filled in by distinguish() once every fit is read
        # the sweep's value (budgets below a policy's cheapest schedule are clamped up)
        "requested_fraction": (metrics.get("budget_request") or {}).get("fraction") or metrics["budget_fraction"],
        "budget_fraction": metrics["budget_fraction"],
        "budget": metrics["budget"],
        "cost_unit": metrics["cost_unit"],
        "val_accuracy": metrics["val"]["accuracy"],
        "test_accuracy": metrics["test"]["accuracy"],
        "val_avg_cost": metrics["val"]["avg_cost"],
        "test_avg_cost": metrics["test"]["avg_cost"],
        "test_exit_fractions": json.dumps([round(f, 6) for f in metrics["test"]["exit_fractions"]]),
        "fit_seconds": metrics.get("fit_seconds"),
        "run": str(run),
    }


def temperatures(comp: Comparison, model: Model) -> torch.Tensor | None:
    """The per-exit temperatures a calibrate=true fit of ``model`` found (all its fits share the
    validation set they are fitted on), or None where none calibrated."""
    for fit in comp.fits:
        if fit.get("model") == model.name and fit.get("calibration"):
            return torch.tensor(fit["calibration"]["temperatures"], dtype=torch.float32)
    return None


def risk_points(comp: Comparison) -> list[dict[str, Any]]:
    """Per certifying fit of a risk-controlled policy: its epsilon, loss, realised test risk and
    cost saved, beside the uncertified baseline (its rule fitted to the same empirical risk on the
    model's validation predictions, untested) on the same test predictions."""
    points = []
    for fit in comp.fits:
        info = fit.get("fitted") or {}
        model = next((m for m in comp.models.values() if m.name == fit.get("model")), None)
        if not policy_class(fit["policy"]).risk_controlled or not info.get("certify") or model is None:
            continue
        policy, unit, loss = ExitPolicy.load(fit["policy_file"]), fit["cost_unit"], info["loss"]
        # the baseline sees what the certified rule was calibrated on: with calibrate=true, the part
        # of validation the temperatures were not fitted on
        split = (fit.get("calibration") or {}).get("split")
        val = temperature_split(model.val, split["temperature_fraction"], split["seed"])[1] if split else model.val
        base = policy.uncertified().fit(val, None, unit, temperature=policy.temperature)  # type: ignore[attr-defined]
        S = evaluate(base, model.test, unit)
        points.append(
            {
                "model": model.name,
                "loss": loss,
                "epsilon": info["epsilon"],
                "delta": info["delta"],
                "calibration_size": info["calibration_size"],
                "certified": info["certified"],
                "threshold": info["threshold"],
                "calibrated": policy.temperature is not None,
                "test_risk": fit["test"]["risk"][loss],
                "cost_saved": 1 - fit["test"]["avg_cost_fraction"],
                "uncertified_threshold": base.info["threshold"],
                "uncertified_test_risk": S["risk"][loss],
                "uncertified_cost_saved": 1 - S["avg_cost_fraction"],
            }
        )
    return sorted(points, key=lambda p: (p["model"], p["loss"], p["calibrated"], p["epsilon"]))


def write_csv(comp: Comparison, path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({c: r.get(c, "") for c in CSV_COLUMNS} for r in comp.rows)
    return path


def write_group_csv(comp: Comparison, path: Path) -> Path:
    """One row per seed group, policy, unit and budget: the statistics over seeds."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=GROUP_CSV_COLUMNS)
        writer.writeheader()
        for g in comp.group_stats:
            a = g.accuracy
            writer.writerow(
                {
                    "group": g.group,
                    "policy": g.policy,
                    "cost_unit": g.cost_unit,
                    "requested_fraction": g.requested_fraction,
                    "seeds": " ".join(str(sd) for sd in g.seeds),
                    "n": a.n,
                    "mean": a.mean,
                    "std": _blank(a.std),
                    "ci_low": _blank(a.ci_low),
                    "ci_high": _blank(a.ci_high),
                    "mean_test_avg_cost": g.mean_test_avg_cost,
                    **_difference_columns(g),
                }
            )
    return path


def _blank(v: Any) -> Any:
    return "" if v is None else v


def _difference_columns(g: GroupStat) -> dict[str, Any]:
    d = g.difference
    if d is None:
        return {"baseline": g.baseline or "", "verdict": NO_SPREAD if g.accuracy.n == 1 else ""}
    return {
        "baseline": g.baseline,
        "diff_n": d.n,
        "diff_mean": d.mean,
        "diff_ci_low": _blank(d.ci_low),
        "diff_ci_high": _blank(d.ci_high),
        "diff_p_t": _blank(d.p_t),
        "diff_p_sign_flip": _blank(d.p_sign_flip),
        "detectable": _blank(d.detectable),
        "verdict": d.verdict,
    }


# ----------------------------------------------------------------------------- seeds as an axis
def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b.c": leaf}`` (lists are leaves)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _training_keys(config: dict[str, Any]) -> dict[str, str]:
    """What a run trained: its flattened config without seeds, paths and logging (JSON values)."""
    root = config.get("paths.output_dir")
    keep = {}
    for k, v in config.items():
        if any(k == p or k.startswith(p + ".") for p in NOT_TRAINING):
            continue
        if isinstance(v, str) and root and str(root) in v:  # checkpoint dirs and the like: the run's own
            continue
        keep[k] = json.dumps(v, sort_keys=True)
    return keep


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each key by its shortest dotted suffix that no other key ends with."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for i in range(len(parts) - 1, -1, -1):
            tail = ".".join(parts[i:])
            if sum(1 for o in keys if o == tail or o.endswith("." + tail)) == 1:
                out[k] = tail
                break
        else:
            out[k] = k
    return out


def group_seeds(comp: Comparison) -> None:
    """Group the models whose training configs differ only in their seed, and name each group by
    its training and the settings that tell it from the others (``bilevel (lr=0.05)``); a model
    without a saved config is a group of its own. Fills each model's ``group`` and each row's
    ``group`` and ``seed``."""
    keys = {
        name: _training_keys(m.config) if m.config else {"run": json.dumps(name)} for name, m in comp.models.items()
    }
    groups: dict[tuple[tuple[str, str], ...], list[Model]] = defaultdict(list)
    for name, m in comp.models.items():
        groups[tuple(sorted(keys[name].items()))].append(m)
    configs = [dict(k) for k in groups]
    # a setting tells groups apart where the groups that have it disagree (keys only one kind of
    # training has, such as a gater's, say no more than the training's name does)
    all_keys = sorted({k for c in configs for k in c})
    telling = [k for k in all_keys if len({c[k] for c in configs if k in c}) > 1 and k != "training._target_"]
    short = _short_keys(telling)
    labels = []
    for c, members in zip(configs, groups.values()):
        items = " ".join(f"{short[k]}={_text(json.loads(c[k]))}" for k in telling if k in c)
        base = members[0].training if len({m.training for m in members}) == 1 else "mixed"
        labels.append(f"{base} ({items})" if items and len(groups) > 1 else base)
    for label in {lb for lb in labels if labels.count(lb) > 1}:  # same name, other settings
        for i, idx in enumerate(j for j, lb in enumerate(labels) if lb == label):
            labels[idx] = f"{label} #{i + 1}"
    for label, members in zip(labels, groups.values()):
        for m in members:
            m.group = label
    by_name = {m.name: m for m in comp.models.values()}
    for r in comp.rows:
        m = by_name.get(r["model"])
        r["group"], r["seed"] = (m.group, _blank(m.seed)) if m is not None else (r["model"], "")


def group_names(comp: Comparison) -> list[str]:
    return sorted({m.group for m in comp.models.values() if m.group})


def seed_statistics(comp: Comparison, baseline: str | None = None) -> None:
    """Per group, policy (with its settings), unit and requested budget: the test accuracy over the
    group's seeds, and with ``baseline`` (a group's name, or a model's in it) the paired difference
    of every other group to it by seed. Fills ``comp.group_stats`` and the rows' group columns."""
    comp.baseline = resolve_baseline(comp, baseline) if baseline else None
    cells: dict[tuple[str, str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in comp.rows:
        if not per_exit(r) and r.get("group"):
            cells[(r["group"], policy_label(r), r["cost_unit"], round(float(r["requested_fraction"]), 3))].append(r)
    comp.group_stats = []
    for (group, policy, unit, fraction), rows in sorted(cells.items()):
        acc = summarise([float(r["test_accuracy"]) for r in rows])
        stat = GroupStat(
            group,
            policy,
            unit,
            fraction,
            [r["seed"] if r["seed"] != "" else None for r in rows],
            acc,
            sum(float(r["test_avg_cost"]) for r in rows) / len(rows),
            comp.baseline,
        )
        base_rows = cells.get((comp.baseline, policy, unit, fraction), []) if comp.baseline else []
        if comp.baseline and group != comp.baseline and base_rows:
            stat.difference = _paired(rows, base_rows)
        comp.group_stats.append(stat)
        for r in rows:
            r.update(
                {
                    "group_n": acc.n,
                    "group_mean": acc.mean,
                    "group_std": _blank(acc.std),
                    "group_ci_low": _blank(acc.ci_low),
                    "group_ci_high": _blank(acc.ci_high),
                }
            )
            r.update({k: v for k, v in _difference_columns(stat).items() if k != "detectable"})


def _paired(rows: list[dict[str, Any]], base_rows: list[dict[str, Any]]) -> Difference | None:
    """The paired difference over the seeds both groups ran once each (a seed run twice in a
    group is ambiguous to pair, and is left out)."""

    def by_seed(rs: list[dict[str, Any]]) -> dict[Any, float]:
        seeds = [r["seed"] for r in rs]
        return {r["seed"]: float(r["test_accuracy"]) for r in rs if r["seed"] != "" and seeds.count(r["seed"]) == 1}

    mine, base = by_seed(rows), by_seed(base_rows)
    shared = sorted(set(mine) & set(base))
    if not shared:
        return None
    return paired_difference([mine[s] for s in shared], [base[s] for s in shared])


def resolve_baseline(comp: Comparison, baseline: str) -> str:
    """``compare.baseline``: a group's name, or the name of a model in a group."""
    names = group_names(comp)
    if baseline in names:
        return baseline
    model = next((m for m in comp.models.values() if m.name == baseline), None)
    if model is not None and model.group:
        return model.group
    raise EENNError(
        f"compare.baseline={baseline!r} is neither a group nor a model of this comparison; groups: {names}."
    )
