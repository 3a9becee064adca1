"""Fixtures for the policy tests: synthetic validation/test predictions of a 3-exit network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eenn.policies.synthetic import synthetic_predictions
from eenn.predictions import Predictions


@pytest.fixture(scope="session")
def val() -> Predictions:
    return synthetic_predictions(1500, seed=0)


@pytest.fixture(scope="session")
def test_preds() -> Predictions:
    return synthetic_predictions(2000, seed=1, split="test")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A stage-1 run dir holding only synthetic val and test predictions (what eenn-fit reads)."""
    run = tmp_path / "train_run"
    synthetic_predictions(600, seed=0).save(run / "predictions" / "val.safetensors")
    synthetic_predictions(800, seed=1, split="test").save(run / "predictions" / "test.safetensors")
    return run


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are small: one thread is as fast, and far faster when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
