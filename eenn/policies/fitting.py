"""The work of ``eenn-fit``: load a stage-1 run's predictions, fit a policy to a budget on the
validation split, evaluate it on both splits and write the policy file and ``metrics.json``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eenn.errors import EENNError
from eenn.evaluation.offline import evaluate
from eenn.evaluation.predictions import Predictions, check_compatible
from eenn.policies.base import ExitPolicy, build_policy, check_budget
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
    if budget < lo:
        warnings.append(f"{key}={raw} gives budget {budget:g} {unit}, below the cheapest the policy can do on validation ({lo:g}); clamped to {lo:g}.")
        budget = lo
    elif budget > full:
        warnings.append(f"{key}={raw} gives budget {budget:g} {unit}, above the full model's cost; clamped to {full:g}.")
        budget = full
    for w in warnings:
        log.warning("%s", w)
    return budget, warnings


def fit_run(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Fit ``cfg.policy`` for ``cfg.budget`` and write ``policy.safetensors`` and ``metrics.json``
    in ``out_dir``. Returns the metrics."""
    out_dir = Path(out_dir)
    policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
    if not isinstance(policy_cfg, dict) or "name" not in policy_cfg:
        raise EENNError("policy must be a config group with a name (e.g. policy=maxprob).")
    policy = build_policy(**policy_cfg)
    val, test = load_split_predictions(cfg)
    unit = cost_unit(cfg, val)
    budget, warnings = resolve_budget(cfg, policy, val, unit)
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
