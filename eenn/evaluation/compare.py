"""Compare exit policies across budgets: the stage-1 models and the rows of their stage-2 fits,
with the per-exit (anytime) points and the oracle ceiling from the stage-1 test predictions, and
the results table as CSV."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eenn.evaluation.offline import evaluate
from eenn.policies import ExitPolicy, budget_ceiling, build_policy, policy_class
from eenn.predictions import Predictions
from eenn.utils.io import atomic_path

CSV_COLUMNS = [
    "model", "training", "policy", "settings", "requested_fraction", "budget_fraction", "budget", "cost_unit", "val_accuracy", "test_accuracy",
    "val_avg_cost", "test_avg_cost", "test_exit_fractions", "fit_seconds", "run",
]


@dataclass
class Model:
    """A stage-1 run: its name, training stage, and test predictions (for anytime and oracle points)."""

    name: str
    run_dir: Path
    training: str
    test: Predictions
    val: Predictions

    def static_points(self, unit: str) -> list[dict[str, Any]]:
        costs = self.test.costs_in(unit)
        acc = self.test.accuracy_per_exit()
        return [{"exit": n, "avg_cost": float(c), "accuracy": float(a)}
                for n, c, a in zip(self.test.exit_names, costs.tolist(), acc.tolist())]

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
class Comparison:
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    models: dict[str, Model] = field(default_factory=dict)
    fits: list[dict[str, Any]] = field(default_factory=list)  # every fit run's full metrics

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
        settings = [{**fits[r["run"]].get("hparams", {}), "calibrate": bool(fits[r["run"]].get("calibration"))}
                    for r in rows]
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
        base = policy.uncertified().fit(model.val, None, unit, temperature=policy.temperature)  # type: ignore[attr-defined]
        S = evaluate(base, model.test, unit)
        points.append({
            "model": model.name, "loss": loss, "epsilon": info["epsilon"], "delta": info["delta"],
            "calibration_size": info["calibration_size"], "certified": info["certified"], "threshold": info["threshold"],
            "calibrated": policy.temperature is not None, "test_risk": fit["test"]["risk"][loss],
            "cost_saved": 1 - fit["test"]["avg_cost_fraction"], "uncertified_threshold": base.info["threshold"],
            "uncertified_test_risk": S["risk"][loss], "uncertified_cost_saved": 1 - S["avg_cost_fraction"],
        })
    return sorted(points, key=lambda p: (p["model"], p["loss"], p["calibrated"], p["epsilon"]))


def write_csv(comp: Comparison, path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(comp.rows)
    return path
