"""The eenn-train job: stage 1 as one function, config in, complete run dir out
(:class:`eenn.rundir.TrainRun`: checkpoints, cost profile, predictions of both held-out splits,
metrics); stage 2 takes the run dir as its input."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from eenn.checkpoints import check_fits, load_weights
from eenn.cost import CostProfile, profile_costs
from eenn.data.datamodule import EENNDataModule
from eenn.errors import EENNError, check_flag, check_number, is_number
from eenn.evaluation.objective import OBJECTIVES, search_objective
from eenn.models.multi_exit import MultiExitNetwork
from eenn.predictions import SPLITS
from eenn.rundir import TrainRun
from eenn.tasks.build import build_network, instantiate
from eenn.tasks.loggers import finish_wandb, log_table
from eenn.training.joint import MultiExitModule, metric_key
from eenn.training.predict import make_predictions
from eenn.utils.nested import flatten
from eenn.utils.provenance import code_version
from eenn.utils.trainer import interruptible_fit

log = logging.getLogger("eenn.train")
SRUN_WARNING = "The `srun` command is available on your system but is not used"


def build_module(cfg: DictConfig, network: MultiExitNetwork, num_classes: int, costs: CostProfile) -> MultiExitModule:
    """The stage-1 LightningModule of ``cfg.training`` around ``network``."""
    # objects go in after instantiation: Hydra would turn the CostProfile dataclass into a dict
    return instantiate(cfg.training, _partial_=True, _convert_="all")(
        network=network, num_classes=num_classes, cost_profile=costs
    )


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, loggers); an
    entry whose factory returns None (a logger switched off) is left out."""
    if not cfg:
        return []
    built = [instantiate(c, _convert_="all") for c in cfg.values() if c is not None and "_target_" in c]
    return [obj for obj in built if obj is not None]


def log_cost_table(loggers: list[Logger], costs: CostProfile) -> None:
    log_table(loggers, "costs", CostProfile.table_columns, costs.table())


@contextlib.contextmanager
def quiet_outside_slurm() -> Iterator[None]:
    """Lightning looks for SLURM when a trainer is built and again in ``fit``, and wherever the
    `srun` command exists warns each time that it "is not used". Outside a SLURM job that is every
    run on a machine with Slurm installed (a cluster's login node); inside one it may point at a
    real mistake, and stays."""
    with warnings.catch_warnings():
        if "SLURM_JOB_ID" not in os.environ:
            warnings.filterwarnings("ignore", message=SRUN_WARNING)
        yield


def check_config(cfg: DictConfig) -> None:
    """Refuse the stage-1 settings Lightning would take in silence (``max_epochs=-1`` trains
    forever, ``0`` saves an untrained network) or fail on with a traceback."""
    for key, value in flatten(OmegaConf.to_container(cfg)).items():
        if isinstance(value, float) and not math.isfinite(value) and not key.startswith("hydra."):
            raise EENNError(f"{key} must be a finite number, got {value!r}.")
    check_number(cfg.trainer.max_epochs, "trainer.max_epochs", 1, integer=True)
    check_flag(cfg.cost.latency, "cost.latency")
    at = cfg.exits.get("at")
    if at is not None and not isinstance(at, str) and len(at) == 0 and cfg.exits.get("spacing") is None:
        # a plain backbone builds (the cost tables use one), but it is not what stage 1 trains
        raise EENNError("exits.at is empty; give at least one block to exit after, or exits.at=stages.")
    check_number(cfg.seed, "seed", 0, integer=True)
    check_training(cfg)
    objective = cfg.get("objective")
    names = [objective] if isinstance(objective, str) else list(objective or [])
    if [n for n in names if n not in OBJECTIVES]:
        raise EENNError(f"objective must name one or more of {list(OBJECTIVES)} (or be null), got {objective!r}.")


def check_training(cfg: DictConfig) -> None:
    """The optimisers' and losses' settings that torch refuses with a traceback only once training
    has started, or takes in silence (a negative mixup_alpha is Mixup off, an ema_decay of 2 an
    average that diverges)."""
    t = cfg.training
    for node in ("optimizer", "gater_optimizer"):
        for key in ("lr", "weight_decay", "momentum"):
            if t.get(node) is not None and key in t[node]:
                check_number(t[node][key], f"training.{node}.{key}", 0, strict=key == "lr")
    smoothing = t.get("label_smoothing", 0.0)
    if not is_number(smoothing) or not 0 <= smoothing < 1:
        raise EENNError(f"training.label_smoothing must be a number in [0, 1), got {smoothing!r}.")
    for key in ("mixup_alpha", "cutmix_alpha"):
        check_number(t.get(key, 0.0), f"training.{key}", 0)
    decay = t.get("ema_decay")
    if decay is not None and (not is_number(decay) or not 0 < decay < 1):
        raise EENNError(f"training.ema_decay must be a number in (0, 1) or null, got {decay!r}.")
    batch = cfg.data.get("batch_size")
    if (t.get("mixup_alpha", 0) > 0 or t.get("cutmix_alpha", 0) > 0) and is_number(batch, integer=True) and batch % 2:
        raise EENNError(f"training.mixup_alpha/cutmix_alpha need an even data.batch_size, got {batch}.")


def objective_values(cfg: DictConfig, metrics: dict[str, Any]) -> float | list[float] | None:
    """What the job returns to a sweeper: the value ``objective`` names, or the list of values it
    lists (a multi-objective study), from the run's metrics; None without an objective."""
    objective = cfg.get("objective")
    if not objective or "objective" not in metrics:
        return None
    if isinstance(objective, str):
        return float(metrics["objective"][objective])
    return [float(metrics["objective"][name]) for name in objective]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run stage 1 into ``cfg.paths.output_dir`` and return the metrics written there. A run dir
    holding a run is refused unless ``ckpt_path`` resumes it or ``force`` is set."""
    # Everything that can be refused is checked before the first file is written.
    check_config(cfg)
    run = TrainRun(cfg.paths.output_dir)
    force = check_flag(cfg.get("force", False), "force")
    if cfg.get("resume") and not force:  # resume=<dir> force=true restarts the run in its dir
        TrainRun(cfg.resume).check_resume(cfg)
    with run.claimed(force=force, resume=not force and run.resumes(cfg)):
        return _train(cfg, run)


def _train(cfg: DictConfig, run: TrainRun) -> dict[str, Any]:
    ckpt_path = run.resume_checkpoint(cfg.get("ckpt_path"))
    pl.seed_everything(cfg.seed, workers=True)
    t0 = time.perf_counter()
    code = code_version()  # the code this stretch of training ran (a resumed run: the last stretch's)

    dm: EENNDataModule = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    network = build_network(cfg, dm)

    costs = profile_costs(
        network,
        dm.input_shape,
        latency=cfg.cost.latency,
        latency_batch_size=cfg.cost.batch_size,
        repeats=cfg.cost.repeats,
    )
    log.info(
        "cost profile (per sample; latency at batch %s on %s):\n%s", cfg.cost.batch_size, costs.device, costs.format()
    )

    module = build_module(cfg, network, dm.num_classes, costs)
    if ckpt_path:
        check_fits(module, ckpt_path, "ckpt_path")
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks"))
    with quiet_outside_slurm():
        trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)

        if trainer.is_global_zero:
            run.write_config(cfg)
            run.write_costs(costs)
            for lg in loggers:
                lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
            log_cost_table(loggers, costs)

        # weights_only: loading a checkpoint runs no pickled code
        interruptible_fit(
            trainer, module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True
        )

    ckpt_cb = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    if best:
        load_weights(module, best, "checkpoint")

    metrics: dict[str, Any] = {}
    if trainer.is_global_zero:
        device = module.device
        names = network.exit_names
        saved = {}
        for split in SPLITS:
            saved[split] = preds = make_predictions(
                network, dm.split_loader(split), costs, dm.class_names, split, str(run.path), device
            )
            run.write_predictions(preds)
            metrics[f"{split}_accuracy"] = dict(zip(names, preds.accuracy_per_exit().tolist()))
        if cfg.get("objective"):  # what a search over exits optimises: from validation alone
            metrics["objective"] = search_objective(saved["val"], costs.backbone["flops"])
        # the test metrics come from the saved predictions: a separate trainer.test pass would
        # run the same network over the same images once more
        for lg in loggers:
            lg.log_metrics(
                {f"test/acc/{metric_key(n)}": a for n, a in metrics["test_accuracy"].items()}, step=trainer.global_step
            )
            lg.save()  # fit has finalized the loggers: TensorBoard holds these in a new, unflushed event file
        metrics.update(
            {
                "training": type(module).__name__.removesuffix("Training").lower(),
                "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
                "data": cfg.data.name,
                "exit_names": names,
                "num_classes": dm.num_classes,
                "costs_flops": costs.per_exit("flops"),
                "backbone_flops": costs.backbone["flops"],
                "best_checkpoint": best or None,
                "epochs": trainer.current_epoch,
                "train_seconds": time.perf_counter() - t0,
                "code": code,
                "resumed_from": str(ckpt_path) if ckpt_path else None,
            }
        )
        run.write_metrics(metrics)
        print_summary(metrics)
    finish_wandb()
    return metrics


def print_summary(metrics: dict[str, Any]) -> None:
    table = Table(title="per-exit accuracy")
    for col in ("exit", "cost (x backbone FLOPs)", "val acc", "test acc"):
        table.add_column(col, justify="right")
    for k, name in enumerate(metrics["exit_names"]):
        table.add_row(
            name,
            f"{metrics['costs_flops'][k] / metrics['backbone_flops']:.3f}",
            f"{metrics['val_accuracy'][name]:.4f}",
            f"{metrics['test_accuracy'][name]:.4f}",
        )
    Console().print(table)
