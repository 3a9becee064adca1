"""Two-process DDP on CPU (gloo): every val/test sample lands in the predictions exactly once, in order:
row i of each file is the saved network's output on sample i of the split."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eenn.rundir import TrainRun
from eenn.tasks.build import datamodule, load_network


@pytest.mark.slow
def test_ddp_two_processes_write_each_sample_once_in_dataset_order(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "EENN_ROOT": str(tmp_path)}
    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "eenn-train"),
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_epochs=1",
            "cost.latency=false",
            "logger=csv",
            "trainer.enable_progress_bar=false",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    run = TrainRun(path)
    dm = datamodule(run)
    dm.setup()
    network = load_network(run, "best", dm)
    for split, ds in (("val", dm.val_set), ("test", dm.test_set)):
        p = run.predictions(split)
        assert len(p.labels) == len(ds)  # the DistributedSampler's padding is not in the file
        assert torch.equal(p.labels, ds.y)  # dataset order, as far as the labels tell
        # the samples themselves: labels repeat, so a shuffle within a class would pass the line above
        # (sample i fetched by index, batched by the split loader's own collate: its normalisation)
        x, y = dm.split_loader(split).collate_fn([ds[i] for i in range(len(ds))])
        assert torch.equal(y, ds.y)
        with torch.no_grad():
            torch.testing.assert_close(p.logits, network(x), rtol=1e-4, atol=1e-4)
