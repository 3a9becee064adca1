"""The GPU paths, end to end, as a user runs them on a CUDA machine.

1. ``eenn-train trainer=gpu trainer.precision=bf16-mixed`` (ResNet-20, exits after each group, a
   short schedule on cifar10_small, or digits without it): trains, writes predictions.
2. ``eenn-fit`` (maxprob at 0.7 of the full cost) on that run.
3. ``eenn-infer device=cuda`` with the fitted policy: its speed table, and the engine taking the
   same exit as the offline simulation for every sample (on CUDA).
4. ``benchmarks/train_speed.py --device cuda --precision bf16-mixed``: eenn against plain loops.

Writes ``benchmarks/results/gpu_check.json``. On a machine without CUDA the full run stops with
one line; ``--quick`` there records that nothing could be checked and exits 0 (the slow test tier
runs every benchmark's ``--quick``, and CI has no GPU).

    python benchmarks/gpu_check.py            # ~5 min on one GPU
    python benchmarks/gpu_check.py --quick    # 2 epochs of 4 batches, no speed benchmark
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import add_output_args, output_path

from eenn.utils.io import write_json

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "gpu_check.json"
BIN = Path(sys.executable).parent
CIFAR10_SMALL = Path(os.environ.get("EENN_SHARED", REPO.parent / "shared")) / "datasets" / "cifar10_small.npz"


def run(cmd: list[str], log: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    add_output_args(parser)
    args = parser.parse_args()
    out = output_path(args, OUT)
    result: dict[str, Any] = {"cuda_available": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        if not args.quick:
            raise SystemExit("no CUDA device here: run benchmarks/gpu_check.py on a machine with a GPU.")
        result["skipped"] = "no CUDA device: nothing was checked"
        write_json(out, result)
        print(result["skipped"], f"-> {out}")
        return
    result["gpu"] = torch.cuda.get_device_name()
    work = out.parent / "gpu_check_runs"
    work.mkdir(parents=True, exist_ok=True)
    data = ["data=cifar10_small", f"data.path={CIFAR10_SMALL}"] if CIFAR10_SMALL.is_file() else ["data=digits"]
    epochs = ["trainer.max_epochs=2", "trainer.limit_train_batches=4"] if args.quick else [f"trainer.max_epochs={args.epochs}"]
    train_dir, fit_dir, infer_dir = work / "train", work / "fit", work / "infer"
    result["train_seconds"] = run([str(BIN / "eenn-train"), *data, "backbone=resnet20", "exits=stages", "trainer=gpu",
                                   "trainer.precision=bf16-mixed", "logger=csv", "trainer.enable_progress_bar=false",
                                   *epochs, f"hydra.run.dir={train_dir}"], work / "train.log")
    result["train_metrics"] = json.loads((train_dir / "metrics.json").read_text())
    run([str(BIN / "eenn-fit"), f"run_dir={train_dir}", "policy=maxprob", "budget.fraction=0.7", "wandb.enabled=false",
         f"hydra.run.dir={fit_dir}"], work / "fit.log")
    run([str(BIN / "eenn-infer"), f"policy_dir={fit_dir}", "device=cuda", f"hydra.run.dir={infer_dir}"], work / "infer.log")
    infer = json.loads((infer_dir / "infer.json").read_text())
    result["infer"] = {k: infer[k] for k in ("device", "accuracy", "agreement", "timing", "exit_fractions")}
    result["engine_equals_offline"] = infer["agreement"]["exit_index"] == 1.0
    if not args.quick:
        speed = out.parent / "train_speed_cuda.json"
        run([sys.executable, str(REPO / "benchmarks" / "train_speed.py"), "--device", "cuda", "--precision", "bf16-mixed",
             "--out", str(speed)], work / "train_speed.log")
        result["train_speed"] = json.loads(speed.read_text())
    write_json(out, result)
    print(json.dumps({k: result[k] for k in ("gpu", "engine_equals_offline", "train_seconds")}), f"-> {out}")


if __name__ == "__main__":
    main()
