"""torch.compile: training.compile=true trains the same losses as eager; a network that does not
compile falls back to eager with one line; compile with DDP on the CPU is refused. (The engine's
compile=true is in tests/inference/test_engine_compile.py.)"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from eenn.cost import profile_costs
from eenn.errors import EENNError
from eenn.tasks.build import instantiate
from eenn.tasks.train import build_module, build_network
from eenn.utils.compile import Compiled


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


def module_for(compose_cfg, *overrides: str) -> tuple[pl.LightningModule, Any]:
    cfg = compose_cfg(
        "train",
        ["data=digits", "data.batch_size=16", "backbone.depth=8", "logger=csv", "cost.latency=false", *overrides],
    )
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    pl.seed_everything(0)
    net = build_network(cfg, dm)
    return build_module(cfg, net, dm.num_classes, profile_costs(net, dm.input_shape, latency=False)), dm


@pytest.mark.slow
def test_compiled_training_takes_the_eager_losses_for_three_steps(compose_cfg):
    losses = {}
    for compile in (False, True):
        module, dm = module_for(compose_cfg, f"training.compile={str(compile).lower()}")
        probe = Losses()
        pl.seed_everything(1)
        pl.Trainer(
            accelerator="cpu",
            max_epochs=1,
            limit_train_batches=3,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[probe],
        ).fit(module, datamodule=dm)
        losses[compile] = probe.losses
        assert (module.compiled is None) == (not compile) and (module.compiled is None or not module.compiled.eager)
    assert len(losses[True]) == 3
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=0)


def test_a_network_that_does_not_compile_runs_eagerly_with_one_warning(caplog):
    def no_compiler(gm: Any, inputs: Any) -> Any:
        raise RuntimeError("no C++ compiler found\nmore detail")

    fn = Compiled(torch.nn.Linear(4, 2), "training.compile=true", "the network", backend=no_compiler)
    x = torch.randn(3, 4)
    with caplog.at_level(logging.WARNING, logger="eenn.compile"):
        out = fn(x)
        fn(x)
    assert fn.eager and torch.equal(out, fn.fn(x))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("training.compile=true: the network could not be compiled")
    assert "no C++ compiler found" in lines[0] and "more detail" not in lines[0]


def test_compile_with_ddp_on_the_cpu_is_refused(compose_cfg):
    module, _ = module_for(compose_cfg, "training.compile=true")
    module.trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False)
    with pytest.raises(EENNError, match="training.compile=true is not supported with DDP on the CPU"):
        module.configure_callbacks()
    with pytest.raises(EENNError, match="training.compile must be true or false"):
        module_for(compose_cfg, "training.compile=maybe")
