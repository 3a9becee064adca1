"""The work of ``eenn-fit``: load a stage-1 run's predictions, fit a policy to a budget on the
validation split, evaluate it on both splits and write the policy file and ``metrics.json``.

Each fit is also one wandb run (``wandb:`` in conf/fit.yaml): group = the stage-1 run's name,
job_type = the policy, the fitted hyper-parameters and budget in its config, accuracies, realised
costs and exit fractions in its summary, its files in ``<fit run dir>/wandb/``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eenn.errors import EENNError
from eenn.evaluation.compare import model_name
from eenn.evaluation.offline import evaluate
from eenn.policies.base import ExitPolicy, build_policy, check_budget
from eenn.predictions import Predictions, check_compatible
from eenn.utils.io import write_json

log = logging.getLogger("eenn")

#: ``cost=`` names that differ from the predictions file's unit names
COST_ALIASES = {"latency": "latency_ms"}
POLICY_FILE = "policy.safetensors"


def load_split_predictions(cfg: DictConfig) -> tuple[Predictions, Predictions]:
    """Validation and test predictions from ``predictions.val``/``predictions.test`` or else from
    ``run_dir``'s ``predictions/`` folder."""
    paths = {}
    for split in ("val", "test"):
        given = cfg.predictions.get(split)
        if given is None and cfg.get("run_dir") is None:
            raise EENNError(
                f"no {split} predictions: set run_dir=<stage-1 run dir> or predictions.{split}=<file>."
            )
        paths[split] = Path(given) if given is not None else Path(cfg.run_dir) / "predictions" / f"{split}.safetensors"
    if cfg.get("run_dir") is not None and not Path(cfg.run_dir).is_dir():
        raise EENNError(f"run_dir={cfg.run_dir!r} is not a directory.")
    val, test = Predictions.load(paths["val"]), Predictions.load(paths["test"])
    check_compatible(val, test)
    return val, test


def cost_unit(cfg: DictConfig, val: Predictions) -> str:
    unit = COST_ALIASES.get(str(cfg.cost), str(cfg.cost))
    have = sorted({val.cost_unit, *val.cost_table})
    if unit not in have:
        raise EENNError(f"cost={cfg.cost!r}: the predictions have no {unit!r} costs; they have {have}.")
    return unit


def resolve_budget(
    cfg: DictConfig, policy: ExitPolicy, val: Predictions, unit: str
) -> tuple[float, list[str]]:
    """The absolute budget from ``budget.value`` (in the cost unit) or ``budget.fraction`` (of the
    last exit's cost), clamped, with a warning, into what the policy can spend on ``val``: from its
    cheapest schedule (normally everyone at exit 0) to the full cost."""
    full = float(val.costs_in(unit)[-1])
    value, fraction = cfg.budget.get("value"), cfg.budget.get("fraction")
    key, raw = ("budget.value", value) if value is not None else ("budget.fraction", fraction)
    budget = check_budget(raw, key) * (1.0 if value is not None else full)
    warnings = []
    lo = policy.cheapest_cost(val, unit)
    # within 1e-4 of a bound is that bound (e.g. the first exit's fraction printed with 4 digits),
    # not a request to warn about
    if budget < lo * (1 - 1e-4):
        warnings.append(f"{key}={raw} gives budget {budget:g} {unit}, below the cheapest the policy can do on validation ({lo:g}); clamped to {lo:g}.")
    elif budget > full * (1 + 1e-4):
        warnings.append(f"{key}={raw} gives budget {budget:g} {unit}, above the full model's cost; clamped to {full:g}.")
    budget = min(max(budget, lo), full)
    for w in warnings:
        log.warning("%s", w)
    return budget, warnings


def stage1_source(cfg: DictConfig, val: Predictions) -> Path | None:
    """The stage-1 run dir the predictions came from: ``run_dir``, else the files' ``source_run``
    metadata, else the folder holding the validation file (``<run>/predictions/val.safetensors``)."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir).resolve()
    if val.source_run:
        return Path(val.source_run)
    if cfg.predictions.get("val"):
        folder = Path(cfg.predictions.val).resolve().parent
        return folder.parent if folder.name == "predictions" else folder
    return None


def stage1_name(run_dir: Path | None) -> str:
    """The stage-1 run's name as eenn-compare names the model (the wandb group of its fits)."""
    return "unknown" if run_dir is None else model_name(run_dir)


def stage1_info(run_dir: Path | None) -> dict[str, Any]:
    """What the stage-1 run's metrics.json says about the model (for filtering in wandb's UI)."""
    info: dict[str, Any] = {"run_dir": str(run_dir) if run_dir else None, "name": stage1_name(run_dir)}
    metrics = run_dir / "metrics.json" if run_dir else None
    if metrics is not None and metrics.is_file():
        try:
            m = json.loads(metrics.read_text())
        except (OSError, ValueError):
            return info
        info.update({k: m[k] for k in ("data", "backbone", "training", "exit_names", "num_classes") if k in m})
    return info


def start_wandb(cfg: DictConfig, out_dir: Path, policy: ExitPolicy, source: Path | None, config: dict[str, Any]) -> Any:
    """The fit's wandb run (None when ``wandb.enabled=false``): one project for all fits,
    group = the stage-1 run's name, job_type = the policy, files in ``out_dir/wandb/``."""
    w = cfg.get("wandb")
    if w is None or not w.get("enabled", True):
        return None
    from eenn.utils.loggers import init_wandb_run

    name = w.get("name") or f"{policy.name}_{config['budget_fraction']:.3f}"
    return init_wandb_run(
        project=w.get("project", "eenn"), dir=out_dir, mode=w.get("mode", "auto"), key="wandb.mode",
        entity=w.get("entity"), group=w.get("group") or stage1_name(source), job_type=policy.name, name=name,
        tags=list(w.get("tags") or []), config=config,
    )


def log_fit(run: Any, policy: ExitPolicy, metrics: dict[str, Any]) -> None:
    """The fitted hyper-parameters into the run's config; accuracies, realised costs and exit
    fractions (as a list and one key per exit) into its summary."""
    run.config.update({"hparams": policy.hparams(), "fitted": metrics["fitted"]}, allow_val_change=True)
    summary: dict[str, Any] = {
        "budget": metrics["budget"], "budget_fraction": metrics["budget_fraction"], "fit_seconds": metrics["fit_seconds"],
    }
    for split in ("val", "test"):
        s = metrics[split]
        summary.update({f"{split}/accuracy": s["accuracy"], f"{split}/avg_cost": s["avg_cost"],
                        f"{split}/avg_cost_fraction": s["avg_cost_fraction"], f"{split}/exit_fractions": s["exit_fractions"]})
        summary.update({f"{split}/exit_fraction/{n}": f for n, f in zip(metrics["exit_names"], s["exit_fractions"])})
    run.summary.update(summary)


def fit_run(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Fit ``cfg.policy`` for ``cfg.budget`` and write ``policy.safetensors`` and ``metrics.json``
    in ``out_dir``; log the fit as a wandb run (``cfg.wandb``). Returns the metrics."""
    out_dir = Path(out_dir)
    policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
    if not isinstance(policy_cfg, dict) or "name" not in policy_cfg:
        raise EENNError("policy must be a config group with a name (e.g. policy=maxprob).")
    policy = build_policy(**policy_cfg)
    val, test = load_split_predictions(cfg)
    unit = cost_unit(cfg, val)
    budget, warnings = resolve_budget(cfg, policy, val, unit)
    source = stage1_source(cfg, val)
    # the wandb run starts only once the input is known good (a refused job leaves no run dir)
    # and always finishes, failed or not: the next job of an in-process sweep gets its own run
    run = start_wandb(cfg, out_dir, policy, source, {
        "policy": policy_cfg, "budget": budget, "budget_fraction": budget / float(val.costs_in(unit)[-1]),
        "budget_request": OmegaConf.to_container(cfg.budget, resolve=True), "cost_unit": unit,
        "stage1": stage1_info(source),
    })
    try:
        metrics = _fit_and_evaluate(cfg, out_dir, policy, val, test, unit, budget, warnings)
        if run is not None:
            log_fit(run, policy, metrics)
    except BaseException:
        if run is not None:
            run.finish(exit_code=1)
        raise
    if run is not None:
        run.finish()
    return metrics


def _fit_and_evaluate(
    cfg: DictConfig, out_dir: Path, policy: ExitPolicy, val: Predictions, test: Predictions, unit: str,
    budget: float, warnings: list[str],
) -> dict[str, Any]:
    start = time.perf_counter()
    policy.fit(val, budget, unit)
    fit_seconds = time.perf_counter() - start
    policy.save(out_dir / POLICY_FILE)
    metrics = {
        "policy": policy.name,
        "budget": budget,
        "budget_fraction": budget / float(val.costs_in(unit)[-1]),
        "cost_unit": unit,
        # the stage-1 run the predictions came from: eenn-compare groups fits by it
        "source_run": str(Path(cfg.run_dir).resolve()) if cfg.get("run_dir") else val.source_run,
        "budget_request": {"fraction": cfg.budget.get("fraction"), "value": cfg.budget.get("value")},
        "exit_names": val.exit_names,
        "fit_seconds": fit_seconds,
        "warnings": warnings,
        "fitted": policy.info,
        "val": evaluate(policy, val, unit),
        "test": evaluate(policy, test, unit),
    }
    write_json(out_dir / "metrics.json", metrics)
    log.info(
        "%s at budget %.4g %s (%.3f of full): val accuracy %.4f, cost %.4g; test accuracy %.4f, cost %.4g (%s)",
        policy.name, budget, unit, metrics["budget_fraction"], metrics["val"]["accuracy"], metrics["val"]["avg_cost"],
        metrics["test"]["accuracy"], metrics["test"]["avg_cost"], out_dir,
    )
    return metrics
