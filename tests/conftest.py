"""Shared fixtures: no network, no wandb prompts, the real Hydra configs composed in-process."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an offline hub lookup otherwise hangs ~47 s
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from eenn.cli.common import conf_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("EENN_SHARED", REPO.parent / "shared")) / "datasets"
CIFAR10_SMALL = SHARED_DATASETS / "cifar10_small.npz"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose a real config (``train``, ``fit``, ...) with overrides; outputs go to tmp_path."""

    def _compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.root_dir = str(tmp_path)
        return cfg

    return _compose


#: with ``pytest.mark.data`` on every test that reads ../shared/datasets (``-m data`` selects them)
requires_cifar10_small = pytest.mark.skipif(
    not CIFAR10_SMALL.is_file(), reason=f"{CIFAR10_SMALL} is absent (offline datasets live in ../shared)"
)
