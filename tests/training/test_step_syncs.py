"""A training step never waits for the device: no host-device synchronisation in joint, bi-level
and soft-threshold steps (counted on the CPU by :class:`eenn.utils.syncs.SyncCounter`), except the
progress bar's and the loggers' reads every ``log_every_n_steps`` steps; and the per-epoch values
that replaced per-step logging are the same numbers."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from eenn.cost import profile_costs
from eenn.tasks.build import instantiate
from eenn.tasks.train import build_module, build_network, instantiate_group, train
from eenn.training.callbacks import RichProgressBarReads, TQDMProgressBarReads
from eenn.training.joint import EpochMeans
from eenn.utils.syncs import SyncCounter

EVERY = 3


class StepSyncs(pl.Callback):
    """The syncs of each training step, from its batch start to the next one."""

    def __init__(self, counter: SyncCounter) -> None:
        self.counter = counter
        self.steps: dict[int, Counter[str]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        where = self.counter.take()
        if batch_idx > 0:
            self.steps[batch_idx - 1] = where


@pytest.mark.parametrize(
    ("method", "bar"), [("joint", "rich"), ("joint", "tqdm"), ("bilevel", "rich"), ("soft_threshold", "tqdm")]
)
def test_training_steps_synchronise_only_where_the_loggers_and_bar_read(compose_cfg, method, bar):
    cfg = compose_cfg(
        "train",
        [
            f"training={method}",
            "data=digits",
            "data.batch_size=8",
            "logger=csv",
            "cost.latency=false",
            f"trainer.log_every_n_steps={EVERY}",
        ],
    )
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    net = build_network(cfg, dm)
    module = build_module(cfg, net, dm.num_classes, profile_costs(net, dm.input_shape, latency=False))
    counter = SyncCounter()
    probe = StepSyncs(counter)
    stock = pl.callbacks.RichProgressBar() if bar == "rich" else pl.callbacks.TQDMProgressBar()
    trainer = instantiate(
        cfg.trainer,
        logger=instantiate_group(cfg.logger),
        callbacks=[stock, probe],
        max_epochs=1,
        limit_train_batches=2 * EVERY + 1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    with counter:
        trainer.fit(module, datamodule=dm)
    assert isinstance(trainer.progress_bar_callback, RichProgressBarReads if bar == "rich" else TQDMProgressBarReads)
    assert len(probe.steps) == 2 * EVERY
    reads = {i for i in probe.steps if (i + 1) % EVERY == 0}
    assert {i: dict(w) for i, w in probe.steps.items() if w and i not in reads} == {}
    for i in reads:  # the loggers' and the bar's reads of train/loss: the counter sees them
        assert probe.steps[i] and all(k.startswith("item @ ") for k in probe.steps[i]), probe.steps[i]
    assert trainer.progress_bar_callback.get_metrics(trainer, module)["train/loss_step"] > 0


def test_epoch_means_are_batch_size_weighted_means():
    means = EpochMeans()
    means.add("train", ("a", "b"), torch.tensor([1.0, 2.0]), 3)
    means.add("train", ("a", "b"), torch.tensor([3.0, 6.0]), 1)
    means.add("train/gater", ("c",), torch.tensor([5.0]), 2)
    means.add("val", ("d",), torch.tensor([7.0]), 2)

    class Single:  # one process: the reduction is the identity
        @staticmethod
        def reduce(t: torch.Tensor, reduce_op: str) -> torch.Tensor:
            return t

    got = {k: float(v) for k, v in means.pop("train", Single()).items()}
    assert got == {"a": pytest.approx(1.5), "b": pytest.approx(3.0), "c": pytest.approx(5.0)}
    assert set(means.sums) == {"val"}


def test_logged_validation_accuracy_is_the_accuracy_of_the_validation_split(compose_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose_cfg(
        "train",
        [
            "data=digits",
            "logger=csv",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=3",
            "trainer.log_every_n_steps=1",
            "cost.latency=false",
            "trainer.enable_progress_bar=false",
        ],
    )
    metrics = train(cfg)
    rows = list(csv.DictReader((Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open()))
    logged = {k: float(v) for r in rows for k, v in r.items() if v and k.startswith(("val/", "train/"))}
    # the epoch's per-exit accuracy, accumulated batch by batch, is the predictions' accuracy of the
    # same weights on the same split
    for name, acc in metrics["val_accuracy"].items():
        assert logged[f"val/acc/{name.replace('.', '_')}"] == pytest.approx(acc, abs=1e-6)
    assert {"train/loss_step", "train/loss_epoch", "train/acc/final", "train/ce/layer1_2", "val/ce"} <= set(logged)
    # the loss's epoch mean, accumulated on the device, is the mean of the three logged step losses
    steps = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert len(steps) == 3 and logged["train/loss_epoch"] == pytest.approx(sum(steps) / 3, rel=1e-6)


@pytest.mark.parametrize("bar", ["rich", "tqdm"])
@pytest.mark.parametrize(("interval", "drawn"), [(0.0, set(range(7))), (1e9, {0, 2, 5, 6})])
def test_progress_bar_redraws_on_reads_the_last_batch_and_at_most_every_interval(
    compose_cfg, monkeypatch, bar, interval, drawn
):
    """Between the steps where it reads values, the bar redraws only once ``min_interval`` has
    passed; the reading steps (every 3rd here) and the epoch's last batch always redraw, so it ends
    showing every batch and the last values read."""
    stock_cls = pl.callbacks.RichProgressBar if bar == "rich" else pl.callbacks.TQDMProgressBar
    draws: list[int] = []
    stock_end = stock_cls.on_train_batch_end

    def counting(self, trainer, module, outputs, batch, batch_idx):
        draws.append(batch_idx)
        stock_end(self, trainer, module, outputs, batch, batch_idx)

    monkeypatch.setattr(stock_cls, "on_train_batch_end", counting)
    monkeypatch.setattr(RichProgressBarReads if bar == "rich" else TQDMProgressBarReads, "min_interval", interval)
    cfg = compose_cfg("train", ["data=digits", "data.batch_size=8", "logger=csv", "cost.latency=false"])
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    net = build_network(cfg, dm)
    module = build_module(cfg, net, dm.num_classes, profile_costs(net, dm.input_shape, latency=False))
    trainer = instantiate(
        cfg.trainer,
        logger=instantiate_group(cfg.logger),
        callbacks=[stock_cls()],
        max_epochs=1,
        limit_train_batches=7,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=EVERY,
    )
    trainer.fit(module, datamodule=dm)
    assert set(draws) == drawn
    shown = trainer.progress_bar_callback
    if bar == "tqdm":
        assert shown.train_progress_bar.n == 7
    else:
        assert shown.progress.tasks[shown.train_progress_bar_id].completed == 7
