"""eenn's cluster workflow through a real slurmctld and hydra-submitit-launcher:
a policy sweep, a sweep with a failing job (``slurm_cpu``), training jobs requeued mid-training (by Slurm, as
preemption looks, and by submitit on its pre-timeout signal) that resume to the uninterrupted
run's result, and 2-task DDP under srun (``slurm_cpu_train``, the CPU twin of ``slurm_gpu``)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from eenn.data import EENNDataModule
from eenn.predictions import Predictions
from eenn.rundir import FitRun, TrainRun
from tests.reliability.test_resume_determinism import assert_same_checkpoint
from tests.slurm.conftest import BIN, REPO, eenn, job_ids, sacct_rows, sacct_states

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

# small jobs: one CPU and 1 GB each, so the one node runs two at a time
SMALL_JOBS = [
    "hydra.launcher.partition=cpu",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=20",
]
SLURM_CPU = ["hydra/launcher=slurm_cpu", *SMALL_JOBS]  # stage 2
SLURM_TRAIN = ["hydra/launcher=slurm_cpu_train", *SMALL_JOBS]  # stage 1: slurm_gpu's twin


def test_policy_sweep_every_job_completes_and_compare_takes_them_all(slurm, digits_run, tmp_path):
    sweep = tmp_path / "sweep"
    res = eenn(
        "fit",
        "-m",
        *SLURM_CPU,
        f"run_dir={digits_run}",
        "policy=maxprob,entropy",
        "budget=sweep5",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    states = sacct_states(job_ids(sweep))
    assert len(states) == 10 and set(states.values()) == {"COMPLETED"}, states
    fits = [FitRun(p) for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(fits) == 10 and all(f.finished() for f in fits)
    assert "sacct" not in res.stderr  # accounting is configured: submitit's polls do not warn

    res = eenn("compare", f"sweeps=[{sweep}]", f"hydra.run.dir={tmp_path / 'compare'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [r for r in (tmp_path / "compare" / "results.csv").read_text().splitlines()[1:] if r]
    assert len(rows) == 10


def test_a_failing_job_keeps_the_others_and_is_named(slurm, digits_run, tmp_path):
    sweep = tmp_path / "sweep"
    res = eenn(
        "fit",
        "-m",
        *SLURM_CPU,
        f"run_dir={digits_run}",
        "policy=maxprob",
        "budget.fraction=0.6,-1",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert res.returncode == 1
    assert f"1 job(s) of the sweep in {sweep} failed: 1_budget.fraction=-1,policy=maxprob " in res.stderr
    assert FitRun(sweep / "0_budget.fraction=0.6,policy=maxprob").finished()
    assert FitRun(sweep / "1_budget.fraction=-1,policy=maxprob").failed()
    assert set(sacct_states(job_ids(sweep)).values()) == {"COMPLETED"}  # the job ran; its fit was refused


TRAIN = [
    "data=digits",
    "exits=stages",
    "logger=csv",
    "cost.latency=false",
    "trainer=slurm",
    "ckpt_path=last",
    "trainer.max_epochs=8",
    "trainer.limit_train_batches=6",
    "trainer.enable_progress_bar=false",
]


def _wait_for(what: str, check, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _release(job: str) -> None:
    """A requeued job waits about two minutes (its BeginTime) before Slurm starts it again."""
    _wait_for(
        f"job {job} to be requeued",
        lambda: (
            subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
            == "PENDING"
        ),
    )
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


def test_requeued_training_jobs_resume_to_the_uninterrupted_result(slurm, tmp_path):
    """Three jobs of one config (their logging interval, which changes nothing computed, tells
    them apart): job 0 is requeued by Slurm (``scontrol requeue``: preemption), job 1 gets
    submitit's pre-timeout signal (USR2: submitit checkpoints the job and requeues it), job 2
    runs through. Each restart resumes from its run dir's last.ckpt, and all three end equal."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen(
        [
            str(BIN / "eenn-train"),
            "-m",
            *SLURM_TRAIN,
            *TRAIN,
            "trainer.log_every_n_steps=50,51,52",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for("the sweep's jobs", lambda: (sweep / ".submitit").is_dir() and len(job_ids(sweep)) == 3)
        (array,) = {j.split("_")[0] for j in job_ids(sweep)}

        def run(i: int) -> Path:  # a job's dir appears when it starts (two run at a time here)
            return next(iter(sweep.glob(f"{i}_*")), sweep / f"{i}_not_started")

        interrupted = {0: ["scontrol", "requeue", f"{array}_0"], 1: ["scancel", "--signal=USR2", f"{array}_1"]}
        pending = dict(interrupted)

        def interrupt_at_first_checkpoint() -> bool:
            for i in [i for i in pending if (run(i) / "checkpoints" / "last.ckpt").is_file()]:
                assert not TrainRun(run(i)).finished()  # mid-training
                subprocess.run(pending.pop(i), check=True)
            return not pending

        _wait_for("the jobs' first checkpoints", interrupt_at_first_checkpoint)
        for i in interrupted:
            _release(f"{array}_{i}")
        out, err = launcher.communicate(timeout=600)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, err[-3000:]
    runs = [run(i) for i in range(3)]
    for i in interrupted:
        log = (runs[i] / "train.log").read_text()
        assert "Restoring states from the checkpoint path at" in log, f"job {i} did not resume"
    history = sacct_rows([array], attempts=True)
    assert sorted(history) == [
        (f"{array}_0", "COMPLETED"),
        (f"{array}_0", "REQUEUED"),
        (f"{array}_1", "COMPLETED"),
        (f"{array}_1", "REQUEUED"),
        (f"{array}_2", "COMPLETED"),
    ], history
    for i in interrupted:
        assert_same_checkpoint(runs[2] / "checkpoints" / "last.ckpt", runs[i] / "checkpoints" / "last.ckpt")
        for split in ("val", "test"):
            assert torch.equal(TrainRun(runs[2]).predictions(split).logits, TrainRun(runs[i]).predictions(split).logits)


def test_two_task_ddp_under_srun_writes_each_sample_once(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    res = eenn(
        "train",
        "-m",
        *SLURM_TRAIN,
        "hydra.launcher.tasks_per_node=2",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "cost.latency=false",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "seed=0",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    log = (run / "train.log").read_text()
    assert (
        "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2"
        in (sweep / ".submitit").joinpath(job_ids(sweep)[0], f"{job_ids(sweep)[0]}_0_log.err").read_text() + log
    )
    dm = EENNDataModule(name="digits", val_size=0.2, seed=0)
    dm.setup()
    for split, ds in (("val", dm.val_set), ("test", dm.test_set)):
        p = Predictions.load(run / "predictions" / f"{split}.safetensors")
        assert len(p.labels) == len(ds) and torch.equal(p.labels, ds.y)
