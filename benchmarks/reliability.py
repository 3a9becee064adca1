"""Reliability benchmark: a run stopped mid-epoch (an exception raised in-process by a callback,
tests/reliability/crash.py; the SIGKILL cases are tests/reliability/test_forced_redo.py's) and
resumed gives the predictions of an uninterrupted one, and DDP with 2 processes writes every val/test sample exactly
once. Writes
benchmarks/results/reliability.json. (eenn-fit's peak memory on large files: fit_memory.py.)

    python benchmarks/reliability.py                 # both (a few minutes on 2 CPU cores)
    python benchmarks/reliability.py --quick          # the same: it is already small
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from common import add_output_args, compose_cfg, output_path, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = REPO / "benchmarks" / "results" / "reliability.json"


def resume_equality(tmp: Path) -> dict[str, bool]:
    """A run crashed mid-epoch and resumed with ckpt_path=last ends as the uninterrupted run: the
    same predictions and the same last checkpoint (weights, optimiser state)."""
    sys.path.insert(0, str(REPO))
    from eenn.rundir import TrainRun
    from eenn.tasks.train import train
    from tests.reliability.crash import SimulatedCrash

    small = [
        "logger=csv",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=6",
        "cost.latency=false",
        "trainer.enable_progress_bar=false",
        "data.augment=cifar",
    ]
    train(compose_cfg("train", small, tmp / "whole"))
    crash = [
        "+callbacks.crash._target_=tests.reliability.crash.CrashAt",
        "+callbacks.crash.epoch=2",
        "+callbacks.crash.batch=3",
    ]
    crashed = False
    try:
        train(compose_cfg("train", [*small, *crash], tmp / "resumed"))
    except SimulatedCrash:
        crashed = True
    train(compose_cfg("train", [*small, "ckpt_path=last"], tmp / "resumed"))
    whole, resumed = TrainRun(tmp / "whole"), TrainRun(tmp / "resumed")
    same_predictions = all(
        torch.equal(resumed.predictions(s).logits, whole.predictions(s).logits) for s in ("val", "test")
    )
    last = [torch.load(r.checkpoint("last"), weights_only=True) for r in (whole, resumed)]
    same_last = last[0]["global_step"] == last[1]["global_step"] and all(
        torch.equal(v, last[1]["state_dict"][k]) for k, v in last[0]["state_dict"].items()
    )
    return {
        "crashed": crashed,
        "same_predictions": same_predictions,
        "same_last_checkpoint": same_last,
        "resume_equal": crashed and same_predictions and same_last,
    }


def ddp_coverage(tmp: Path) -> bool:
    """2-process DDP on CPU: every val/test sample once, in dataset order: row i of each file is
    the saved network's output on sample i of the split (labels alone repeat, so a shuffle within
    a class would pass a check of them)."""
    from eenn.rundir import TrainRun
    from eenn.tasks.build import datamodule, load_network

    env = {**os.environ, "EENN_ROOT": str(tmp / "ddp")}
    subprocess.run(
        [
            str(BIN / "eenn-train"),
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_epochs=1",
            "cost.latency=false",
            "logger=csv",
            "trainer.enable_progress_bar=false",
        ],
        env=env,
        cwd=tmp,
        check=True,
        capture_output=True,
        timeout=600,
    )
    (path,) = (tmp / "ddp" / "outputs" / "train" / "runs").iterdir()
    run = TrainRun(path)
    dm = datamodule(run)
    dm.setup()
    network = load_network(run, "best", dm)
    for split, ds in (("val", dm.val_set), ("test", dm.test_set)):
        p = run.predictions(split)
        x, y = dm.split_loader(split).collate_fn([ds[i] for i in range(len(ds))])  # sample i, by index
        with torch.no_grad():
            logits = network(x)
        if not (torch.equal(p.labels, y) and torch.allclose(p.logits, logits, rtol=1e-4, atol=1e-4)):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_args(ap)
    args = ap.parse_args()
    results = output_path(args, RESULTS)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "r").mkdir()
        out = {
            "resume": resume_equality(tmp / "r"),
            "ddp_each_sample_once": ddp_coverage(tmp),
            "machine": {
                "cpus": os.cpu_count(),
                "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            },
        }
    write_result(results, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
