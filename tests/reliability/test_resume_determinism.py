"""Resume after a crash, and determinism: the same seed gives the same files, and a resumed run
ends where an uninterrupted one does."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eenn.errors import EENNError
from eenn.predictions import Predictions
from eenn.tasks.train import train
from tests.reliability.crash import SimulatedCrash

SMALL = ["logger=csv", "trainer.max_epochs=3", "trainer.limit_train_batches=4", "cost.latency=false",
         "trainer.enable_progress_bar=false", "data.augment=cifar", "training.kl_alpha=0.1", "training.kl_start=0.3"]


def _preds(run: Path, split: str = "test") -> Predictions:
    return Predictions.load(run / "predictions" / f"{split}.safetensors")


def test_same_seed_same_metrics_and_predictions(compose_cfg, tmp_path):
    runs = []
    for i in range(2):
        cfg = compose_cfg("train", SMALL)
        cfg.paths.output_dir = str(tmp_path / f"run{i}")
        train(cfg)
        runs.append(Path(cfg.paths.output_dir))
    for split in ("val", "test"):
        assert torch.equal(_preds(runs[0], split).logits, _preds(runs[1], split).logits)
    m = [json.loads((r / "metrics.json").read_text()) for r in runs]
    assert m[0]["test_accuracy"] == m[1]["test_accuracy"]


def test_resumed_run_equals_uninterrupted_run(compose_cfg, tmp_path):
    whole = compose_cfg("train", SMALL)
    whole.paths.output_dir = str(tmp_path / "whole")
    train(whole)

    crashed = compose_cfg("train", [*SMALL, "+callbacks.crash._target_=tests.reliability.crash.CrashAt",
                                    "+callbacks.crash.epoch=2", "+callbacks.crash.batch=2"])
    crashed.paths.output_dir = str(tmp_path / "resumed")
    with pytest.raises(SimulatedCrash):
        train(crashed)
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1  # the end of the last finished epoch
    assert "RNGStateCallback" in ckpt["callbacks"] and ckpt["optimizer_states"] and ckpt["lr_schedulers"]

    resumed = compose_cfg("train", [*SMALL, "ckpt_path=last"])
    resumed.paths.output_dir = str(tmp_path / "resumed")
    train(resumed)
    for split in ("val", "test"):
        assert torch.equal(_preds(tmp_path / "whole", split).logits, _preds(tmp_path / "resumed", split).logits)


def test_last_without_a_checkpoint_starts_fresh_and_bad_checkpoints_are_refused(compose_cfg, tmp_path):
    cfg = compose_cfg("train", [*SMALL, "trainer.max_epochs=1", "ckpt_path=last"])
    train(cfg)  # nothing to resume: a fresh run
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(last.read_bytes()[:1000])
    cfg = compose_cfg("train", [*SMALL, f"ckpt_path={bad}"])
    with pytest.raises(EENNError, match=r"ckpt_path=.*cut.ckpt' is not a readable checkpoint \(truncated or tampered\?\)"):
        train(cfg)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_ckpt_path_last_equals_the_uninterrupted_run(compose_cfg, tmp_path):
    """The real thing, as a preempted job sees it: eenn-train is SIGKILLed mid-epoch, then the same
    command with ckpt_path=last in the same run dir finishes with the uninterrupted run's predictions."""
    whole = compose_cfg("train", SMALL)
    whole.paths.output_dir = str(tmp_path / "whole")
    train(whole)

    run_dir = tmp_path / "killed"
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(repo)}
    cmd = [str(Path(sys.executable).parent / "eenn-train"), *SMALL, f"hydra.run.dir={run_dir}", f"paths.root_dir={tmp_path}"]
    kill = ["+callbacks.kill._target_=tests.reliability.crash.KillAt", "+callbacks.kill.epoch=2", "+callbacks.kill.batch=2"]
    killed = subprocess.run([*cmd, *kill], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run_dir / "predictions").exists()
    resumed = subprocess.run([*cmd, "ckpt_path=last"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for split in ("val", "test"):
        assert torch.equal(_preds(tmp_path / "whole", split).logits, _preds(run_dir, split).logits)
