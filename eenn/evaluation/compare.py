"""Compare exit policies across budgets: collect stage-2 runs, add the per-exit (anytime) points
and the oracle ceiling from the stage-1 predictions, and write results.csv, plots and report.html."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from eenn.errors import EENNError
from eenn.evaluation.offline import evaluate
from eenn.predictions import Predictions
from eenn.utils.io import atomic_path

log = logging.getLogger("eenn.compare")

CSV_COLUMNS = [
    "model", "training", "policy", "requested_fraction", "budget_fraction", "budget", "cost_unit", "val_accuracy", "test_accuracy",
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
        from eenn.policies import build_policy

        costs = self.test.costs_in(unit)
        curve = []
        for b in torch.linspace(float(costs[0]), float(costs[-1]), points).tolist():
            policy = build_policy("oracle_budget").fit(self.test, b, unit)
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
    fits: list[dict[str, Any]] = field(default_factory=list)  # full metrics.json of each fit run

    @property
    def policies(self) -> list[str]:
        return sorted({r["policy"] for r in self.rows})


def _training_stage(run_dir: Path) -> str:
    """``joint``/``bilevel``... from the stage-1 metrics.json (older runs: their Hydra config)."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file() and "training" in (m := json.loads(metrics.read_text())):
        return str(m["training"])
    cfg_file = run_dir / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        return "unknown"
    target = str(OmegaConf.load(cfg_file).get("training", {}).get("_target_", ""))
    return target.rsplit(".", 1)[-1].replace("Training", "").lower() or "unknown"


def model_name(run_dir: Path) -> str:
    """A stage-1 run's name in comparisons (and wandb groups): its dir's name, or for a pipeline,
    which keeps its stage-1 run in <pipeline>/train, the pipeline's name, which says more."""
    return run_dir.parent.name if run_dir.name == "train" else run_dir.name


def load_model(run_dir: str | Path) -> Model:
    run_dir = Path(run_dir)
    files = [run_dir / "predictions" / f"{s}.safetensors" for s in ("val", "test")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise EENNError(f"stage-1 run dir {str(run_dir)!r} lacks {missing}: is it an eenn-train run dir of this version?")
    return Model(model_name(run_dir), run_dir, _training_stage(run_dir), Predictions.load(files[1]), Predictions.load(files[0]))


def _fit_source(fit_dir: Path, metrics: dict[str, Any]) -> Path | None:
    """The stage-1 run a fit job used: metrics' ``source_run``, else its config's run_dir."""
    if metrics.get("source_run"):
        return Path(metrics["source_run"])
    cfg_file = fit_dir / ".hydra" / "config.yaml"
    if cfg_file.is_file():
        run_dir = OmegaConf.load(cfg_file).get("run_dir")
        return Path(run_dir) if run_dir else None
    return None


def _job_dirs(path: Path) -> list[Path]:
    """A fit run dir itself, or every job dir of a sweep (a dir with metrics.json, error.json or .hydra/)."""
    if (path / "metrics.json").is_file() or (path / "error.json").is_file():
        return [path]
    return sorted(
        d for d in path.iterdir()
        if d.is_dir() and ((d / "metrics.json").is_file() or (d / "error.json").is_file() or (d / ".hydra").is_dir())
    )


def collect(sweeps: list[str | Path], runs: list[str | Path] = ()) -> Comparison:
    """Read stage-2 run/sweep dirs and the stage-1 runs they came from (plus any ``runs`` given)."""
    comp = Comparison()
    for r in runs:
        m = load_model(r)
        comp.models[str(m.run_dir.resolve())] = m
    for sweep in map(Path, sweeps):
        if not sweep.is_dir():
            raise EENNError(f"sweeps: {str(sweep)!r} is not a directory.")
        for job in _job_dirs(sweep):
            metrics_file, error_file = job / "metrics.json", job / "error.json"
            if not metrics_file.is_file():
                reason = json.loads(error_file.read_text()).get("message", "failed") if error_file.is_file() else "no metrics.json (failed or unfinished)"
                comp.failures.append({"run": str(job), "reason": reason})
                continue
            metrics = json.loads(metrics_file.read_text())
            source = _fit_source(job, metrics)
            model = None
            if source is not None:
                key = str(source.resolve())
                if key not in comp.models and (source / "predictions").is_dir():
                    comp.models[key] = load_model(source)
                model = comp.models.get(key)
            comp.fits.append({**metrics, "run": str(job)})
            comp.rows.append({
                "model": model.name if model else (source.name if source else "unknown"),
                "training": model.training if model else "unknown",
                "policy": metrics["policy"],
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
                "run": str(job),
            })
    comp.rows.sort(key=lambda r: (r["model"], r["policy"], r["cost_unit"], r["budget"]))
    if not comp.rows and not comp.failures:
        raise EENNError(f"sweeps={[str(s) for s in sweeps]} hold no eenn-fit runs (no metrics.json found).")
    return comp


def write_csv(comp: Comparison, path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(comp.rows)
    return path
