"""A tiny digits run (ResNet-20 with the demo's four exits, two training batches) and a maxprob fit
of it, made once for the Python API's tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from eenn.cli.common import conf_dir
from eenn.tasks.fit import fit_run
from eenn.tasks.train import train

TRAIN = [
    "data=digits",
    "backbone=resnet20",
    "exits=early",
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "cost.latency=false",
    "trainer.enable_progress_bar=false",
]


def compose_in(name: str, overrides: list[str], root: Path, out: Path):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir, cfg.paths.output_dir = str(root), str(out)
    return cfg


@dataclass
class Digits:
    run: Path  # an eenn-train run dir
    fit: Path  # an eenn-fit run dir: maxprob at half the full cost


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Digits:
    root = tmp_path_factory.mktemp("api")
    run, fit = root / "train", root / "fit"
    train(compose_in("train", TRAIN, root, run))
    fit_run(
        compose_in(
            "fit", [f"run_dir={run}", "policy=maxprob", "budget.fraction=0.5", "wandb.enabled=false"], root, fit
        ),
        fit,
    )
    return Digits(run, fit)
