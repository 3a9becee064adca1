"""A one-node SLURM cluster for the `slurm` tests (``make test-slurm``): started by
``scripts/local_slurm.sh`` for the session and stopped after it, unless one was already running
there, which is left as it was. Skips where Slurm is missing and cannot be installed (not root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from eenn.cli.common import conf_dir

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "local_slurm.sh"
BIN = Path(sys.executable).parent


def _cluster_is_up(env: dict[str, str]) -> bool:
    status = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True, text=True)
    return "slurmctld: running" in status.stdout and "slurmd: running" in status.stdout


@pytest.fixture(scope="session")
def slurm() -> Iterator[Path]:
    """The cluster's dir; ``SLURM_CONF`` points at it for this process and every command it runs."""
    if shutil.which("slurmctld") is None and os.geteuid() != 0:
        pytest.skip("Slurm is not installed, and installing it (scripts/local_slurm.sh) needs root")
    env = {**os.environ, "EENN_SLURM_DIR": os.environ.get("EENN_SLURM_DIR", "/tmp/eenn-slurm")}
    ours = not _cluster_is_up(env)
    if ours:
        started = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=600)
        assert started.returncode == 0, started.stderr
    cluster = Path(env["EENN_SLURM_DIR"])
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster / "slurm.conf")
    try:
        yield cluster
    finally:
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before
        if ours:
            subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """A finished stage-1 run on digits, trained here in seconds."""
    from eenn.tasks.train import train

    out = tmp_path_factory.mktemp("stage1") / "run"
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["debug=fast", "logger=csv", "cost.latency=false"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.root_dir = str(out.parent)
    train(cfg)
    return out


def eenn(app: str, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``eenn-<app> args`` as a user runs it, in ``cwd``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [str(BIN / f"eenn-{app}"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def job_ids(sweep: Path) -> list[str]:
    """The SLURM job ids of a submitit sweep (``<sweep>/.submitit/<id>/``; array tasks ``<id>_<i>``)."""
    return sorted(p.name for p in (sweep / ".submitit").iterdir() if any(p.glob("*_submitted.pkl")))


def sacct_rows(ids: list[str], attempts: bool = False, timeout: float = 60) -> list[tuple[str, str]]:
    """(job id, state) as accounting recorded them; ``attempts``: every attempt of a requeued job
    too (``sacct -D``). A job's end reaches the accounting database a moment after its result
    reached submitit: wait until no job is still active."""
    end = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", *(["-D"] if attempts else []), "-o", "JobID,State", "-j", ",".join(ids)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows = [tuple(line.split("|", 1)) for line in out.split()]
        if time.monotonic() > end or not {s for _, s in rows} & {"PENDING", "RUNNING", "COMPLETING"}:
            return rows  # type: ignore[return-value]
        time.sleep(0.5)


def sacct_states(ids: list[str]) -> dict[str, str]:
    """Each job's final state."""
    return dict(sacct_rows(ids))
