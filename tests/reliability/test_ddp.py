"""Two-process DDP on CPU (gloo): every val/test sample lands in the predictions exactly once, in order."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eenn.data import EENNDataModule
from eenn.predictions import Predictions


@pytest.mark.slow
def test_ddp_two_processes_write_each_sample_once_in_dataset_order(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "EENN_ROOT": str(tmp_path)}
    res = subprocess.run(
        [str(Path(sys.executable).parent / "eenn-train"), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.max_epochs=1", "cost.latency=false", "logger=csv", "trainer.enable_progress_bar=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    dm = EENNDataModule(name="digits", val_size=0.2, seed=0)
    dm.setup()
    for split, ds in (("val", dm.val_set), ("test", dm.test_set)):
        p = Predictions.load(run / "predictions" / f"{split}.safetensors")
        assert len(p.labels) == len(ds)  # the DistributedSampler's padding is not in the file
        assert torch.equal(p.labels, ds.y)  # dataset order
