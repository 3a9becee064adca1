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

SMALL = [
    "logger=csv",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=4",
    "cost.latency=false",
    "trainer.enable_progress_bar=false",
    "data.augment=cifar",
    "training.kl_alpha=0.1",
    "training.kl_start=0.3",
]
# What a resumed run must restore besides the weights: joint (above) its self-distillation switch;
# bi-level phi's optimiser, the batch count that times the gater (every 2 batches here) and lambda,
# which follows the training budget by dual ascent.
TRAININGS = {
    "joint": SMALL,
    "bilevel": [*SMALL[:6], "training=bilevel", "training.gater_every=2", "training.budget=0.6"],
}


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


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Weights, buffers (batch-norm statistics, bi-level's lambda), optimiser and scheduler states."""
    ca, cb = (torch.load(p, weights_only=True) for p in (a, b))
    assert ca["epoch"] == cb["epoch"] and ca["global_step"] == cb["global_step"]
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k
    assert len(ca["optimizer_states"]) == len(cb["optimizer_states"])
    for oa, ob in zip(ca["optimizer_states"], cb["optimizer_states"]):
        assert oa["param_groups"] == ob["param_groups"]
        for i, state in oa["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob["state"][i][name])), (i, name)
    assert ca["lr_schedulers"] == cb["lr_schedulers"]


@pytest.mark.parametrize("training", list(TRAININGS))
def test_resumed_run_equals_uninterrupted_run(compose_cfg, tmp_path, training):
    small = TRAININGS[training]
    whole = compose_cfg("train", small)
    whole.paths.output_dir = str(tmp_path / "whole")
    train(whole)

    crashed = compose_cfg(
        "train",
        [
            *small,
            "+callbacks.crash._target_=tests.reliability.crash.CrashAt",
            "+callbacks.crash.epoch=2",
            "+callbacks.crash.batch=2",
        ],
    )
    crashed.paths.output_dir = str(tmp_path / "resumed")
    with pytest.raises(SimulatedCrash):
        train(crashed)
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1  # the end of the last finished epoch
    assert "RNGStateCallback" in ckpt["callbacks"] and ckpt["optimizer_states"] and ckpt["lr_schedulers"]

    resumed = compose_cfg("train", [*small, "ckpt_path=last"])
    resumed.paths.output_dir = str(tmp_path / "resumed")
    train(resumed)
    # the final state is compared whole: predictions alone come from best.ckpt, which may be an
    # epoch from before the crash that both runs share
    assert_same_checkpoint(
        tmp_path / "whole" / "checkpoints" / "last.ckpt", tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    )
    for split in ("val", "test"):
        assert torch.equal(_preds(tmp_path / "whole", split).logits, _preds(tmp_path / "resumed", split).logits)


def test_last_without_a_checkpoint_is_refused_but_in_a_slurm_job_and_bad_checkpoints_are_refused(
    compose_cfg, tmp_path, monkeypatch
):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = compose_cfg("train", [*SMALL, "trainer.max_epochs=1", "ckpt_path=last"])
    with pytest.raises(
        EENNError,
        match=r"ckpt_path=last: .*last.ckpt' does not exist, so there is nothing to "
        r"resume; to continue a crashed run pass resume=<its run dir>",
    ):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()
    monkeypatch.setenv("SLURM_JOB_ID", "17")  # a cluster job's first start: its requeues find last.ckpt
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(last.read_bytes()[:1000])
    cfg = compose_cfg("train", [*SMALL, f"ckpt_path={bad}"])
    cfg.paths.output_dir = str(
        tmp_path / "other"
    )  # the finished run's own dir is refused before the checkpoint is read
    with pytest.raises(
        EENNError, match=r"ckpt_path=.*cut.ckpt' is not a readable checkpoint \(truncated or tampered\?\)"
    ):
        train(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("training", list(TRAININGS))
def test_sigkill_mid_epoch_then_ckpt_path_last_equals_the_uninterrupted_run(compose_cfg, tmp_path, training):
    """The real thing, as a crash looks: eenn-train is SIGKILLed mid-epoch, then the README's command,
    ``eenn-train resume=<run dir>`` and nothing else, finishes with the uninterrupted run's weights,
    optimiser state and predictions."""
    small = TRAININGS[training]
    whole = compose_cfg("train", small)
    whole.paths.output_dir = str(tmp_path / "whole")
    train(whole)

    run_dir = tmp_path / "killed"
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(repo)}
    cmd = [
        str(Path(sys.executable).parent / "eenn-train"),
        *small,
        f"hydra.run.dir={run_dir}",
        f"paths.root_dir={tmp_path}",
    ]
    kill = [
        "+callbacks.kill._target_=tests.reliability.crash.KillAt",
        "+callbacks.kill.epoch=2",
        "+callbacks.kill.batch=2",
        f"+callbacks.kill.once={tmp_path / 'crashed_once'}",
    ]
    killed = subprocess.run([*cmd, *kill], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run_dir / "predictions").exists()
    resume = [str(Path(sys.executable).parent / "eenn-train"), f"resume={run_dir}"]
    resumed = subprocess.run(resume, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")
    for split in ("val", "test"):
        assert torch.equal(_preds(tmp_path / "whole", split).logits, _preds(run_dir, split).logits)
