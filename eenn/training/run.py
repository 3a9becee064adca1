"""Stage 1 as one function: config in, complete run directory out.

The run dir holds ``checkpoints/`` (best + last), ``costs.json``, ``predictions/{val,test}.safetensors``
and ``metrics.json`` (per-exit accuracies); stage 2 takes the run dir as its input.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from eenn.cost import CostProfile, profile_costs
from eenn.data.datamodule import EENNDataModule
from eenn.errors import EENNError
from eenn.models.multi_exit import MultiExitNetwork, build_multi_exit
from eenn.training.joint import MultiExitModule, metric_key
from eenn.training.predict import make_predictions
from eenn.utils.config import instantiate
from eenn.utils.io import write_json
from eenn.utils.loggers import finish_wandb

log = logging.getLogger("eenn.train")


def build_network(cfg: DictConfig, dm: EENNDataModule) -> MultiExitNetwork:
    return build_multi_exit(
        OmegaConf.to_container(cfg.backbone, resolve=True),  # type: ignore[arg-type]
        OmegaConf.to_container(cfg.exits, resolve=True),  # type: ignore[arg-type]
        num_classes=dm.num_classes,
        input_shape=dm.input_shape,
    )


def build_module(cfg: DictConfig, network: MultiExitNetwork, num_classes: int, costs: CostProfile) -> MultiExitModule:
    """The stage-1 LightningModule of ``cfg.training`` around ``network``."""
    # objects go in after instantiation: Hydra would turn the CostProfile dataclass into a dict
    return instantiate(cfg.training, _partial_=True, _convert_="all")(
        network=network, num_classes=num_classes, cost_profile=costs
    )


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    if not cfg:
        return []
    return [instantiate(c, _convert_="all") for c in cfg.values() if c is not None and "_target_" in c]


def resolve_resume_checkpoint(ckpt_path: str | None, run_dir: Path) -> str | None:
    """``last``: this run dir's ``checkpoints/last.ckpt`` if there is one, else a fresh start (what a
    requeued SLURM job wants); a path must exist and be a readable checkpoint."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            log.info("ckpt_path=last: no %s yet, starting from scratch", last)
            return None
        ckpt_path = str(last)
    if not Path(ckpt_path).is_file():
        raise EENNError(f"ckpt_path={ckpt_path!r} does not exist.")
    try:
        torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001  (torch raises several types for a bad archive)
        raise EENNError(f"ckpt_path={ckpt_path!r} is not a readable checkpoint (truncated or tampered?): {exc}") from None
    return ckpt_path


def check_checkpoint_fits(module: pl.LightningModule, ckpt_path: str) -> None:
    """A checkpoint from another model (backbone, exits, number of classes) is refused by name."""
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    own = module.state_dict()
    missing = sorted(set(own) - set(saved))
    wrong = [(k, tuple(saved[k].shape), tuple(v.shape)) for k, v in own.items() if k in saved and saved[k].shape != v.shape]
    if missing or wrong:
        detail = (f"{len(wrong)} tensors differ in shape, e.g. {wrong[0][0]}: checkpoint {wrong[0][1]} vs model {wrong[0][2]}"
                  if wrong else f"{len(missing)} tensors are missing, e.g. {missing[0]}")
        raise EENNError(f"ckpt_path={ckpt_path!r} does not fit this model ({detail}); was it trained with another "
                        "backbone, exits or number of classes?")


def load_weights(module: pl.LightningModule, ckpt_path: str) -> None:
    """Load a Lightning checkpoint's weights safely (``weights_only=True``: no pickle code runs)."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])


def log_cost_table(loggers: list[Logger], costs: CostProfile) -> None:
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.log_table(key="costs", columns=CostProfile.table_columns, data=costs.table())


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run stage 1 and return the metrics written to ``metrics.json``."""
    # Everything that can be refused is checked before the first file is written.
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_resume_checkpoint(cfg.get("ckpt_path"), run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    t0 = time.perf_counter()

    dm: EENNDataModule = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    network = build_network(cfg, dm)

    costs = profile_costs(network, dm.input_shape, latency=cfg.cost.latency,
                          latency_batch_size=cfg.cost.batch_size, repeats=cfg.cost.repeats)
    log.info("cost profile (per sample; latency at batch %s on %s):\n%s", cfg.cost.batch_size, costs.device, costs.format())

    module = build_module(cfg, network, dm.num_classes, costs)
    if ckpt_path:
        check_checkpoint_fits(module, ckpt_path)
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks"))
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)

    if trainer.is_global_zero:
        write_json(run_dir / "costs.json", costs.to_dict())
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        log_cost_table(loggers, costs)

    # weights_only: loading a checkpoint runs no pickled code
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)

    ckpt_cb = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    if best:
        load_weights(module, best)

    metrics: dict[str, Any] = {}
    if trainer.is_global_zero:
        device = module.device
        names = network.exit_names
        for split in ("val", "test"):
            preds = make_predictions(network, dm.split_loader(split), costs, dm.class_names, split, str(run_dir), device)
            preds.save(run_dir / "predictions" / f"{split}.safetensors")
            metrics[f"{split}_accuracy"] = dict(zip(names, preds.accuracy_per_exit().tolist()))
        # the test metrics come from the saved predictions: a separate trainer.test pass would
        # run the same network over the same images once more
        for lg in loggers:
            lg.log_metrics({f"test/acc/{metric_key(n)}": a for n, a in metrics["test_accuracy"].items()},
                           step=trainer.global_step)
        metrics.update({
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
        })
        write_json(run_dir / "metrics.json", metrics)
        print_summary(metrics)
    finish_wandb()
    return metrics


def print_summary(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="per-exit accuracy")
    for col in ("exit", "cost (x backbone FLOPs)", "val acc", "test acc"):
        table.add_column(col, justify="right")
    for k, name in enumerate(metrics["exit_names"]):
        table.add_row(name, f"{metrics['costs_flops'][k] / metrics['backbone_flops']:.3f}",
                      f"{metrics['val_accuracy'][name]:.4f}", f"{metrics['test_accuracy'][name]:.4f}")
    Console().print(table)
