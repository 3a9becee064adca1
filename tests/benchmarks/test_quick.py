"""Every benchmark script runs: its ``--quick`` smoke run (seconds of work) ends well and writes its
JSON, so that a benchmark the README quotes cannot rot unnoticed. Parametrized from the folder: a
new script is picked up by being there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CIFAR10_SMALL

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
#: scripts whose --quick run a test of their own makes and checks further (tests/benchmarks/test_gpu_check.py)
CHECKED_ELSEWHERE = {"gpu_check.py"}
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "common.py" and p.name not in CHECKED_ELSEWHERE)
NEEDS_CIFAR10_SMALL = {"eenet_resnet56_short.py"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "script", [pytest.param(s, marks=pytest.mark.data) if s in NEEDS_CIFAR10_SMALL else s for s in SCRIPTS]
)
def test_benchmark_quick_run_writes_its_json(script, tmp_path):
    if script in NEEDS_CIFAR10_SMALL and not CIFAR10_SMALL.is_file():
        pytest.skip(f"{CIFAR10_SMALL} is absent")
    out = tmp_path / "result.json"
    quoted = {p: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").iterdir()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(BENCHMARKS.parent)}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())  # a JSON document with content
    # a smoke run never writes over the results the README quotes
    assert {p: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").iterdir()} == quoted


@pytest.mark.slow
def test_budget_aware_evaluates_finished_runs_given_to_it(tmp_path):
    # --run NAME=RUN_DIR trains nothing and gives the protocol's numbers for runs made elsewhere:
    # on the quick run's own run dirs, the same curves as the run that trained them
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(BENCHMARKS.parent)}
    script = str(BENCHMARKS / "budget_aware.py")
    trained, given = tmp_path / "trained.json", tmp_path / "given.json"
    subprocess.run(
        [sys.executable, script, "--quick", "--out", str(trained)],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=900,
    )
    first = json.loads(trained.read_text())
    runs = [f"--run={m}={r['run_dir']}" for m, seeds in first["runs"].items() for r in seeds.values()]
    proc = subprocess.run(
        [sys.executable, script, *runs, "--budgets", "2", "--out", str(given)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = json.loads(given.read_text())
    assert list(second["arms"]) == list(first["arms"]) and second["seeds"] == first["seeds"] == [0, 1]
    for arm, seeds in first["runs"].items():
        for seed, run in seeds.items():
            assert second["runs"][arm][seed]["curves"] == run["curves"]
    # the paired differences to joint are the protocol's, whoever trained the runs
    assert (
        second["summary"]["permuted"]["maxprob_test_minus_joint"]
        == first["summary"]["permuted"]["maxprob_test_minus_joint"]
    )
