"""The console script as a user runs it (subprocesses: few, each pays ~6 s of imports)."""

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def _run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "EENN_ROOT": str(cwd)}
    return subprocess.run(
        [str(BIN / "eenn-train"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_eenn_train_debug_run_writes_its_run_dir(tmp_path):
    res = _run(["debug=fast", "backbone=resnet20"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = list((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 1
    for name in (
        "metrics.json",
        "costs.json",
        "predictions/val.safetensors",
        "predictions/test.safetensors",
        ".hydra/config.yaml",
        "checkpoints/last.ckpt",
    ):
        assert (runs[0] / name).is_file(), name
    assert "per-exit accuracy" in res.stdout


def test_bad_input_is_one_clear_line_and_a_nonzero_exit(tmp_path):
    res = _run(["debug=fast", "data=cifar10", f"data.root={tmp_path}/none"], tmp_path)
    assert res.returncode == 2
    assert "error: cifar10 is not in data.root=" in res.stderr and "data.download=false" in res.stderr
    assert "Traceback" not in res.stderr
    runs = tmp_path / "outputs" / "train" / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # the refused job left no run dir behind
    res = _run(["backbone=resnet1000"], tmp_path)
    assert res.returncode != 0
    assert "Could not find 'backbone/resnet1000'" in res.stderr and "resnet56" in res.stderr
