"""Sweeps as users launch them: Hydra multirun through submitit's local executor, then eenn-compare."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eenn.tasks.compare import compare

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_submitit_local_sweep_of_3_budgets_x_2_policies_is_compared_whole(tiny_pipeline, tmp_path):
    env = {**os.environ, "EENN_ROOT": str(tmp_path), "WANDB_MODE": "offline"}
    res = subprocess.run(
        [
            str(BIN / "eenn-fit"),
            "-m",
            "hydra/launcher=local",
            f"run_dir={tiny_pipeline / 'train'}",
            "policy=maxprob,entropy",
            "budget.fraction=0.6,0.8,1.0",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "fit" / "multirun").iterdir()
    comp = compare([str(sweep)], [], tmp_path / "cmp")
    assert len(comp.rows) == 6 and not comp.failures
    assert {(r["policy"], r["requested_fraction"]) for r in comp.rows} == {
        (p, b) for p in ("maxprob", "entropy") for b in (0.6, 0.8, 1.0)
    }


@pytest.mark.slow
def test_a_failing_job_does_not_lose_the_others_and_the_sweep_exits_nonzero(tiny_pipeline, tmp_path):
    env = {**os.environ, "EENN_ROOT": str(tmp_path), "WANDB_MODE": "disabled"}
    res = subprocess.run(
        [
            str(BIN / "eenn-fit"),
            "-m",
            f"run_dir={tiny_pipeline / 'train'}",
            "policy=maxprob",
            "budget.fraction=0.7,-1,0.9",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode != 0
    assert "1 job(s) of the sweep" in res.stderr
    (sweep,) = (tmp_path / "outputs" / "fit" / "multirun").iterdir()
    errors = list(sweep.glob("*/error.json"))
    assert (
        len(errors) == 1
        and "budget.fraction must be a finite positive number" in json.loads(errors[0].read_text())["message"]
    )
    comp = compare([str(sweep)], [], tmp_path / "cmp")
    assert len(comp.rows) == 2 and len(comp.failures) == 1
