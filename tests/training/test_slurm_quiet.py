"""Wherever Slurm is installed, Lightning warns on every run that `srun` "is not used": eenn's
trainings outside a SLURM job and its internal trainers (EENet's scheduler) say nothing of it;
inside a job the warning stays, where it may point at a real mistake."""

import os
import warnings
from pathlib import Path

import pytest

from eenn.policies.base import build_policy
from eenn.policies.synthetic import synthetic_predictions
from eenn.tasks.train import train
from tests.policies.helpers import EENET_FAST

SMALL = [
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "cost.latency=false",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture
def srun_on_path(tmp_path, monkeypatch):
    """A machine with Slurm installed, outside any job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(var)


def _srun_warnings(run) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if "srun" in str(w.message)]


def test_no_srun_warning_outside_a_job_but_inside_one_it_stays(srun_on_path, compose_cfg, tmp_path, monkeypatch):
    cfg = compose_cfg("train", SMALL)
    assert _srun_warnings(lambda: train(cfg)) == []

    monkeypatch.setenv("SLURM_JOB_ID", "7")  # a job step that did not go through srun
    cfg = compose_cfg("train", SMALL)
    cfg.paths.output_dir = str(Path(tmp_path) / "in_job")
    assert _srun_warnings(lambda: train(cfg))  # the check can see the warning it looks for


def test_eenet_fits_without_srun_warnings_even_inside_a_job(srun_on_path, monkeypatch):
    val = synthetic_predictions(600, seed=1)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    fit = lambda: build_policy("eenet", **EENET_FAST).fit(val, 0.6 * float(val.costs[-1]), "flops")  # noqa: E731
    assert _srun_warnings(fit) == []
