"""The eenn-fit job: load a stage-1 run's predictions, fit a policy to a budget on the validation
split, evaluate it on both splits and write the policy file and the metrics
(:class:`eenn.rundir.FitRun`).

Each fit is also one wandb run (the ``wandb:`` config every app shares): group = the stage-1 run's
name, job_type = the policy, the fitted hyper-parameters and budget in its config, accuracies,
realised costs and exit fractions in its summary, its files in ``<fit run dir>/wandb/``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from eenn.errors import EENNError, check_flag, is_number
from eenn.evaluation.calibration import calibration_report, fit_temperatures, temperature_rows, temperature_split
from eenn.evaluation.offline import evaluate
from eenn.policies.base import ExitPolicy, build_policy, check_budget
from eenn.policies.budget import sweep_fractions, within_budget
from eenn.predictions import SPLITS, Predictions, check_compatible, cost_unit_name
from eenn.rundir import FitRun, TrainRun
from eenn.tasks.loggers import start_wandb_run

log = logging.getLogger("eenn")
#: below these, a fit is told: thresholds on a handful of samples say little about test, and
#: temperatures on a handful are pinned at the search's bounds (calibrate=true is refused)
MIN_VAL_SAMPLES, MIN_TEMPERATURE_SAMPLES = 100, 50


def check_config(cfg: DictConfig) -> None:
    """Refuse, before the run dir is touched, ``risk.*`` given on the command line with a policy
    that does not read them (only a policy whose config interpolates ``${risk.*}`` does)."""
    given = [o for o in cfg.hydra.overrides.task if o.lstrip("+").startswith("risk.")] if "hydra" in cfg else []
    policy = OmegaConf.to_container(cfg.policy, resolve=False)
    if given and not any(isinstance(v, str) and "${risk." in v for v in policy.values()):  # type: ignore[union-attr]
        raise EENNError(
            f"{given[0]}: the risk.* keys configure policy=risk, and policy={policy.get('name')} reads "  # type: ignore[union-attr]
            "none of them; add policy=risk, or leave them out."
        )


def load_split_predictions(cfg: DictConfig) -> tuple[Predictions, Predictions]:
    """Validation and test predictions from ``predictions.val``/``predictions.test`` or else from
    the stage-1 run ``run_dir``."""
    paths = {}
    for split in SPLITS:
        given = cfg.predictions.get(split)
        if given is None and cfg.get("run_dir") is None:
            raise EENNError(f"no {split} predictions: set run_dir=<stage-1 run dir> or predictions.{split}=<file>.")
        paths[split] = Path(given) if given is not None else TrainRun(cfg.run_dir).predictions_file(split)
    if cfg.get("run_dir") is not None:
        if not Path(cfg.run_dir).is_dir():
            raise EENNError(f"run_dir={cfg.run_dir!r} is not a directory.")
        TrainRun(cfg.run_dir).settle()
        TrainRun(cfg.run_dir).check_app("run_dir")
    val, test = Predictions.load(paths["val"]), Predictions.load(paths["test"])
    check_compatible(val, test)
    return val, test


def cost_unit(cfg: DictConfig, val: Predictions) -> str:
    """The unit ``cost`` names; unset, the predictions' own ``cost_unit`` (a file whose only
    unit is not flops fits without being told)."""
    if cfg.get("cost") is None:
        return val.cost_unit
    unit = cost_unit_name(str(cfg.cost))
    have = sorted({val.cost_unit, *val.cost_table})
    if unit not in have:
        raise EENNError(f"cost={cfg.cost!r}: the predictions have no {unit!r} costs; they have {have}.")
    return unit


def requested_fraction(cfg: DictConfig, costs: torch.Tensor) -> float | None:
    """The fraction of the full cost ``budget`` asks for: ``budget.point`` of ``budget.points``
    on the sweep of :func:`sweep_fractions` when set, else ``budget.fraction`` as given (None
    where ``budget.value`` sets the budget)."""
    b = cfg.budget
    if b.get("value") is not None:
        return None
    if b.get("point") is None:
        return b.get("fraction")
    n, i = b.get("points"), b.point
    if not is_number(n, integer=True) or n < 2:
        raise EENNError(f"budget.points must be an integer >= 2 with budget.point set, got {n!r}.")
    if not is_number(i, integer=True) or not 0 <= i < n:
        raise EENNError(f"budget.point must be an integer in 0..{n - 1}, got {i!r}.")
    return sweep_fractions(costs, n)[i]


def resolve_budget(
    cfg: DictConfig, policy: ExitPolicy, val: Predictions, unit: str, requested: float | None
) -> tuple[float, list[str]]:
    """The absolute budget from ``budget.value`` (in the cost unit), or from ``requested`` (the
    fraction of the last exit's cost that ``budget.point`` or ``budget.fraction`` asks for:
    :func:`requested_fraction`), clamped, with a warning, into what
    the policy can spend on ``val``: from its cheapest schedule (normally everyone at exit 0) to
    the full cost."""
    full = float(val.costs_in(unit)[-1])
    value, point = cfg.budget.get("value"), cfg.budget.get("point")
    if value is not None:
        key, raw = "budget.value", value
        budget = check_budget(value, key)
    else:
        key, raw = ("budget.fraction", cfg.budget.get("fraction")) if point is None else ("budget.point", point)
        budget = check_budget(requested, "budget.fraction") * full
    warnings = []
    lo = policy.cheapest_cost(val, unit)
    # within 1e-4 of a bound is that bound (e.g. the first exit's fraction printed with 4 digits),
    # not a request to warn about
    if budget < lo * (1 - 1e-4):
        warnings.append(
            f"{key}={raw} gives budget {budget:g} {unit}, below the cheapest the policy can do on validation ({lo:g}); "
            f"clamped to {lo:g}."
        )
    elif budget > full * (1 + 1e-4):
        warnings.append(
            f"{key}={raw} gives budget {budget:g} {unit}, above the full model's cost; clamped to {full:g}."
        )
    budget = min(max(budget, lo), full)
    for w in warnings:
        log.warning("%s", w)
    return budget, warnings


def stage1_source(cfg: DictConfig, val: Predictions) -> TrainRun | None:
    """The stage-1 run the predictions came from: ``run_dir``, else the files' ``source_run``
    metadata, else the run (or folder) holding the validation file."""
    if cfg.get("run_dir"):
        return TrainRun(Path(cfg.run_dir).resolve())
    if val.source_run:
        return TrainRun(val.source_run)
    if cfg.predictions.get("val"):
        return TrainRun.holding(cfg.predictions.val)
    return None


def stage1_info(run: TrainRun | None) -> dict[str, Any]:
    """What the stage-1 run's metrics say about the model (for filtering in wandb's UI)."""
    info: dict[str, Any] = {"run_dir": str(run.path) if run else None, "name": run.name if run else "unknown"}
    if run is not None and run.finished():
        try:
            m = run.metrics()
        except EENNError:
            return info
        info.update({k: m[k] for k in ("data", "backbone", "training", "exit_names", "num_classes") if k in m})
    return info


def log_fit(run: Any, policy: ExitPolicy, metrics: dict[str, Any]) -> None:
    """The fitted hyper-parameters into the run's config; accuracies, realised costs and exit
    fractions (as a list and one key per exit) into its summary."""
    run.config.update({"hparams": policy.hparams(), "fitted": metrics["fitted"]}, allow_val_change=True)
    summary: dict[str, Any] = {
        "budget": metrics["budget"],
        "budget_fraction": metrics["budget_fraction"],
        "fit_seconds": metrics["fit_seconds"],
    }
    for split in ("val", "test"):
        s = metrics[split]
        summary.update(
            {
                f"{split}/accuracy": s["accuracy"],
                f"{split}/avg_cost": s["avg_cost"],
                f"{split}/avg_cost_fraction": s["avg_cost_fraction"],
                f"{split}/exit_fractions": s["exit_fractions"],
            }
        )
        summary.update({f"{split}/exit_fraction/{n}": f for n, f in zip(metrics["exit_names"], s["exit_fractions"])})
    run.summary.update(summary)


@dataclass
class FitRequest:
    """What one fit is asked, resolved once from its config before the run dir is touched: the
    policy, the predictions, the cost unit, the budget (absolute, as a fraction of the full cost,
    and the fraction the config asked for) and the warnings resolving it gave."""

    policy: ExitPolicy
    policy_cfg: dict[str, Any]
    val: Predictions
    test: Predictions
    unit: str
    budget: float
    fraction: float
    requested_fraction: float | None
    source: TrainRun | None
    warnings: list[str] = field(default_factory=list)


def resolve_request(cfg: DictConfig) -> FitRequest:
    """Every value the fit needs, checked: a bad one is refused here, before anything is written."""
    policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
    if not isinstance(policy_cfg, dict) or "name" not in policy_cfg:
        raise EENNError("policy must be a config group with a name (e.g. policy=maxprob).")
    policy = build_policy(**policy_cfg)
    check_flag(cfg.get("calibrate"), "calibrate")
    split = cfg.get("calibrate_split")
    if cfg.calibrate and policy.risk_controlled and not (is_number(split) and 0 < split < 1):
        raise EENNError(
            f"calibrate_split must be a number in (0, 1) (the share of validation the temperatures are "
            f"fitted on), got {split!r}."
        )
    if cfg.calibrate and policy.risk_controlled and not is_number(cfg.get("calibrate_seed"), integer=True):
        raise EENNError(f"calibrate_seed must be an integer, got {cfg.get('calibrate_seed')!r}.")
    val, test = load_split_predictions(cfg)
    temperature_samples = val.num_samples
    if cfg.calibrate and policy.risk_controlled:
        # an empty part is the split's own mistake: named before the temperatures' minimum
        temperature_samples = len(temperature_rows(val.num_samples, float(split), int(cfg.calibrate_seed))[0])
    if cfg.calibrate and temperature_samples < MIN_TEMPERATURE_SAMPLES:
        share = f" (calibrate_split={split} of {val.num_samples})" if policy.risk_controlled else ""
        raise EENNError(
            f"calibrate=true would fit temperatures on {temperature_samples} validation samples{share}; they "
            f"need at least {MIN_TEMPERATURE_SAMPLES} (fewer pin them at the search's bounds): leave "
            "calibrate off, or use a larger validation split (data.val_size)."
        )
    unit = cost_unit(cfg, val)
    requested = requested_fraction(cfg, val.costs_in(unit))
    budget, warnings = resolve_budget(cfg, policy, val, unit, requested)
    if val.num_samples < MIN_VAL_SAMPLES:
        warnings.append(
            f"validation holds {val.num_samples} samples: thresholds fitted on fewer than "
            f"{MIN_VAL_SAMPLES} can miss the budget on test by far (a larger data.val_size fixes it)."
        )
        log.warning("%s", warnings[-1])
    return FitRequest(
        policy,
        policy_cfg,
        val,
        test,
        unit,
        budget,
        budget / float(val.costs_in(unit)[-1]),
        requested,
        stage1_source(cfg, val),
        warnings,
    )


def fit_run(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Fit ``cfg.policy`` for ``cfg.budget`` and write the policy file and metrics into the fit
    run dir ``out_dir``; log the fit as a wandb run (``cfg.wandb``). Returns the metrics."""
    fit = FitRun(out_dir)
    force = check_flag(cfg.get("force", False), "force")
    req = resolve_request(cfg)
    with fit.claimed(force=force):
        return _fit(cfg, fit, req)


def calibrate_and_fit(
    cfg: DictConfig, policy: ExitPolicy, val: Predictions, budget: float, unit: str
) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """Fit ``policy`` on ``val``, with ``calibrate=true`` on logits scaled by temperatures fitted
    on validation. A risk-controlled policy gets temperatures fitted on a random
    ``calibrate_split`` of validation and is calibrated on the rest: fitted on its own calibration
    data, the temperatures would choose its candidate rules from that data and void the guarantee.
    Other policies fit both on all of validation. Returns the temperatures (None without
    calibrate) and the split's record (None without one)."""
    if not cfg.get("calibrate"):
        policy.fit(val, budget, unit)
        return None, None
    if not policy.risk_controlled:
        temperature = fit_temperatures(val)
        policy.fit(val, budget, unit, temperature=temperature)
        return temperature, None
    temp_part, cal_part, split = temperature_split(val, float(cfg.calibrate_split), int(cfg.calibrate_seed))
    temperature = fit_temperatures(temp_part)
    policy.fit(cal_part, budget, unit, temperature=temperature)
    return temperature, split


def _fit(cfg: DictConfig, fit: FitRun, req: FitRequest) -> dict[str, Any]:
    fit.write_config(cfg)  # first: a crash leaves a dir that says whose it is (force=true then clears it)
    policy = req.policy
    start = time.perf_counter()
    # before the wandb run: a policy that refuses its settings leaves no run dir
    temperature, split = calibrate_and_fit(cfg, policy, req.val, req.budget, req.unit)
    fit_seconds = time.perf_counter() - start
    for w in policy.info.get("warnings", []):  # what fitting found wrong (risk: nothing certified)
        log.warning("%s", w)
    req.warnings = [*req.warnings, *policy.info.get("warnings", [])]
    # the wandb run always finishes, failed or not: the next job of an in-process sweep gets its own run
    run = start_wandb_run(
        cfg.get("wandb"),
        fit.path,
        job_type=policy.name,
        name=f"{policy.name}_{req.fraction:.3f}",
        group=req.source.name if req.source else "unknown",
        config={
            "policy": req.policy_cfg,
            "budget": req.budget,
            "budget_fraction": req.fraction,
            "budget_request": OmegaConf.to_container(cfg.budget, resolve=True),
            "cost_unit": req.unit,
            "stage1": stage1_info(req.source),
        },
    )
    try:
        calibration = (
            None
            if temperature is None
            else {**calibration_report(temperature, {"val": req.val, "test": req.test}), "split": split}
        )
        metrics = _evaluate_and_write(cfg, fit, req, fit_seconds, calibration)
        if run is not None:
            log_fit(run, policy, metrics)
    except BaseException:
        if run is not None:
            run.finish(exit_code=1)
        raise
    if run is not None:
        run.finish()
    return metrics


def _evaluate_and_write(
    cfg: DictConfig,
    fit: FitRun,
    req: FitRequest,
    fit_seconds: float,
    calibration: dict[str, Any] | None,
) -> dict[str, Any]:
    policy, val, unit, budget, warnings = req.policy, req.val, req.unit, req.budget, req.warnings
    val_summary = evaluate(policy, val, unit)
    if not within_budget(val_summary["avg_cost"], budget):
        # a policy whose config fixes its decisions (explicit thresholds, patience, p_d) spends
        # what they cost: say so, as the budget promise holds only for policies fitted to it
        warnings = [
            *warnings,
            f"the realised validation cost {val_summary['avg_cost']:g} {unit} exceeds the budget "
            f"{budget:g}: the policy's config fixes its decisions, they were not fitted to the budget.",
        ]
        log.warning("%s", warnings[-1])
    fit.write_policy(policy)
    metrics = {
        "policy": policy.name,
        "budget": budget,
        "budget_fraction": req.fraction,
        "cost_unit": unit,
        # the stage-1 run the predictions came from: eenn-compare groups fits by it
        "source_run": str(Path(cfg.run_dir).resolve()) if cfg.get("run_dir") else val.source_run,
        # a sweep point's fraction as computed: eenn-compare lines policies up by it
        "budget_request": {
            "fraction": req.requested_fraction,
            "value": cfg.budget.get("value"),
            "point": cfg.budget.get("point"),
            "points": cfg.budget.get("points"),
        },
        "exit_names": val.exit_names,
        "fit_seconds": fit_seconds,
        "warnings": warnings,
        "fitted": policy.info,
        # calibrate=true: the temperatures and each exit's ECE before and after, per split
        "calibration": calibration,
        "val": val_summary,
        "test": evaluate(policy, req.test, unit),
    }
    fit.write_metrics(metrics)
    log.info(
        "%s at budget %.4g %s (%.3f of full): val accuracy %.4f, cost %.4g; test accuracy %.4f, cost %.4g (%s)",
        policy.name,
        budget,
        unit,
        metrics["budget_fraction"],
        metrics["val"]["accuracy"],
        metrics["val"]["avg_cost"],
        metrics["test"]["accuracy"],
        metrics["test"]["avg_cost"],
        fit.path,
    )
    return metrics
