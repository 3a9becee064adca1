"""The GPU paths, end to end, as a user runs them on a CUDA machine.

1. ``eenn-train trainer=gpu trainer.precision=bf16-mixed`` (ResNet-20, exits after each group, a
   short schedule on cifar10_small, or digits without it): trains, writes predictions.
2. ``eenn-fit`` (maxprob at 0.7 of the full cost) on that run.
3. ``eenn-infer device=cuda`` with the fitted policy: its speed table. Then the same engine on the
   same test split in this process, for its per-sample exits: every sample takes the offline
   simulation's exit, or else every sample that does not is a near tie. The engine runs later
   stages on the compacted survivors, whose logits differ slightly from those of the offline
   pass's full batches (TF32), so a sample whose score lies within ``TIE`` of a threshold of an
   exit it reaches may exit elsewhere; any other disagreement is a real mismatch.
   The engine's host-device syncs per batch in that run (PyTorch's sync debug mode).
4. Training throughput (``benchmarks/train_speed.py --device cuda --precision bf16-mixed --compile
   --loop-only``, 5 windows of 5 batches): eenn / plain_tuned for joint and bi-level, ResNet-20
   and ResNet-56 on cifar10_small, bf16, channels-last, eager and compiled.
5. The engine at batch 128 (``benchmarks/inference_speed.py --device cuda``): realised against
   latency-predicted speedup for ResNet-56 on CIFAR shapes and a timm ResNet-50 at 224 px on
   random images (compute-bound, where early exit should pay), with the engine's syncs per batch.
6. Host-device syncs per training step, joint and bi-level (``benchmarks/step_overhead.py
   --device cuda --phases syncs``).

``acceptance`` in the JSON puts issue 29's GPU bars next to what was measured: training >= 0.9
plain_tuned (joint) and >= 0.85 (bi-level); the engine >= 0.9 of its latency-predicted speedup on
ResNet-50 at 224 px and no slower than the plain backbone on ResNet-56.

Writes ``benchmarks/results/gpu_check.json`` (steps 4-6 also their own ``*_cuda*.json`` next to
it). On a machine without CUDA the full run stops with one line; ``--quick`` there runs every
step on the CPU at smoke size (``"device": "cpu"`` in the JSON; no compiling), so the slow test
tier, which runs every benchmark's ``--quick`` and has no GPU, exercises the code path (on the CPU
the engine must agree exactly).

    python benchmarks/gpu_check.py            # one H100: ~8 min (steps 1-3 ~1.5 min, 4 ~5, 5-6 ~1; estimated)
    python benchmarks/gpu_check.py --quick    # 2 epochs of 4 batches, smoke-sized steps 4-6
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
from common import add_output_args, output_path, write_result

from eenn.inference.engine import EarlyExitEngine, batches_of
from eenn.policies.base import ExitPolicy
from eenn.policies.simulate import simulate
from eenn.rundir import FitRun, InferRun, TrainRun
from eenn.tasks.build import datamodule, load_network
from eenn.tasks.infer import load_split
from eenn.utils.overrides import override
from eenn.utils.syncs import SyncCounter

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "gpu_check.json"
CIFAR10_SMALL = Path(os.environ.get("EENN_SHARED", REPO.parent / "shared")) / "datasets" / "cifar10_small.npz"
#: a score this close to its threshold is a tie the engine may break either way: on an H200 with
#: TF32 convolutions (PyTorch's default) maxprob scores moved by up to 1.5e-3 between batch sizes
#: of the same network (1.6e-6 with TF32 off)
TIE = 3e-3


def app(name: str) -> list[str]:
    """``eenn-<name>`` as ``python -m``: works where eenn is on PYTHONPATH but not installed (no console scripts)."""
    return [sys.executable, "-m", f"eenn.cli.{name}"]


def run(cmd: list[str], log: Path) -> float:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": path}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def near_ties(policy: ExitPolicy, logits: torch.Tensor, tolerance: float) -> torch.Tensor:
    """(N,) bool: the samples whose offline score (of a threshold policy: maxprob, entropy, ...)
    lies within ``tolerance`` of the threshold of an exit they reach, the only ones that float
    differences of the logits can send elsewhere. ``logits`` (N, K, C) are the saved predictions'."""
    if policy.temperature is not None:  # as decide() scales them
        logits = logits / policy.temperature.view(1, -1, 1)
    scores = policy.score_matrix(logits)  # (N, K)
    exit_idx = (scores >= policy.thresholds).int().argmax(1)  # the first exit whose score clears its threshold
    reached = torch.arange(scores.shape[1]) <= exit_idx[:, None]
    return (((scores - policy.thresholds).abs() < tolerance) & reached).any(1)


def compare_exits(engine: torch.Tensor, offline: torch.Tensor, ties: torch.Tensor) -> dict[str, Any]:
    """Per-sample exits of the engine against the offline simulation's (N,), given the near ties
    (N,) bool: how many differ, how many of those are not near ties, and whether the two agree
    exactly and up to ties (every disagreeing sample a near tie)."""
    differ = engine != offline
    outside = differ & ~ties
    return {
        "engine_equals_offline": not bool(differ.any()),
        "exit_disagreements": int(differ.sum()),
        "near_ties": int(ties.sum()),
        "disagreements_outside_ties": int(outside.sum()),
        "disagreeing_samples_outside_ties": outside.nonzero().flatten().tolist()[:20],
        "engine_equals_offline_up_to_ties": not bool(outside.any()),
    }


def engine_exits(
    train_dir: Path, policy: ExitPolicy, device: str, batch_size: int = 128
) -> tuple[torch.Tensor, float | None]:
    """(N,) the exit the engine takes for each test sample, in order, on ``device``, with the run's
    best checkpoint and the batch size eenn-infer uses by default; and, on CUDA, its host-device
    syncs per batch of that run (None on the CPU)."""
    run = TrainRun(train_dir)
    dm = datamodule(run)
    dm.setup("test")
    x, y = load_split(dm, "test")
    engine = EarlyExitEngine(load_network(run, "best", dm), policy, device=device)
    batches = list(batches_of(x, batch_size, y))
    with SyncCounter(cuda=device == "cuda") as syncs:
        result = engine.run(batches)
    return result.exit_index.cpu(), (syncs.total / len(batches) if device == "cuda" else None)


def bench(script: str, args: list[str], out: Path, log: Path) -> dict[str, Any]:
    """Run ``benchmarks/<script>`` with ``args``, its JSON to ``out``; that JSON."""
    run([sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)], log)
    return json.loads(out.read_text())


def acceptance(result: dict[str, Any]) -> dict[str, Any]:
    """Issue 29's GPU bars next to what steps 4 and 5 measured (None where a step did not run)."""
    bars: dict[str, Any] = {}
    for backbone, speed in result.get("train_speed", {}).items():
        for method, bar in (("joint", 0.9), ("bilevel", 0.85)):
            for compiled in ("", "_compiled"):
                ratio = speed.get(method, {}).get(f"eenn{compiled}_over_plain_tuned{compiled}")
                bars[f"train {backbone} {method}{compiled}: eenn / plain_tuned >= {bar}"] = (
                    None if ratio is None else {"measured": ratio, "met": ratio >= bar}
                )
    for row in result.get("inference_speed", {}).get("rows", []):
        if row["mode"] != "engine" or row["batch_size"] != 128:
            continue
        if row["backbone"] == "timm_resnet50_224px":
            bars[f"engine {row['backbone']} {row['exit_mix']}: realised / latency-predicted >= 0.9"] = {
                "measured": row["latency_ratio"],
                "met": row["latency_ratio"] >= 0.9,
            }
        else:
            bars[f"engine {row['backbone']} {row['exit_mix']}: realised speedup >= 1"] = {
                "measured": row["realised_speedup"],
                "met": row["realised_speedup"] >= 1.0,
            }
    return bars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    add_output_args(parser)
    args = parser.parse_args()
    out = output_path(args, OUT)
    result: dict[str, Any] = {"cuda_available": torch.cuda.is_available()}
    if not torch.cuda.is_available() and not args.quick:
        raise SystemExit("no CUDA device here: run benchmarks/gpu_check.py on a machine with a GPU.")
    result["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    result["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    try:
        check(args, out, result)
    except SystemExit as failed:  # a step failed: keep what the steps before it found
        result["failed"] = str(failed)
        write_result(out, result)
        raise
    write_result(out, result)
    keys = (
        "device",
        "gpu",
        "engine_equals_offline",
        "exit_disagreements",
        "near_ties",
        "disagreements_outside_ties",
        "engine_equals_offline_up_to_ties",
        "train_seconds",
        "engine_syncs_per_batch",
        "acceptance",
    )
    print(json.dumps({k: result[k] for k in keys}, indent=1), f"-> {out}")


def check(args: argparse.Namespace, out: Path, result: dict[str, Any]) -> None:
    """The six steps, each adding its findings to ``result``."""
    work = out.parent / "gpu_check_runs"
    work.mkdir(parents=True, exist_ok=True)
    data = ["data=cifar10_small", override("data.path", CIFAR10_SMALL)] if CIFAR10_SMALL.is_file() else ["data=digits"]
    epochs = (
        ["trainer.max_epochs=2", "trainer.limit_train_batches=4"]
        if args.quick
        else [override("trainer.max_epochs", args.epochs)]
    )
    train_dir, fit_dir, infer_dir = work / "train", work / "fit", work / "infer"
    device = result["device"]
    trainer = ["trainer=gpu", "trainer.precision=bf16-mixed"] if device == "cuda" else ["trainer=cpu"]
    result["train_seconds"] = run(
        [
            *app("train"),
            *data,
            "backbone=resnet20",
            "exits=stages",
            *trainer,
            "logger=csv",
            "trainer.enable_progress_bar=false",
            *epochs,
            override("hydra.run.dir", train_dir),
        ],
        work / "train.log",
    )
    result["train_metrics"] = TrainRun(train_dir).metrics()
    run(
        [
            *app("fit"),
            override("run_dir", train_dir),
            "policy=maxprob",
            "budget.fraction=0.7",
            "wandb.enabled=false",
            override("hydra.run.dir", fit_dir),
        ],
        work / "fit.log",
    )
    run(
        [
            *app("infer"),
            override("policy_dir", fit_dir),
            override("device", device),
            override("hydra.run.dir", infer_dir),
        ],
        work / "infer.log",
    )
    infer = InferRun(infer_dir).result()
    result["infer"] = {k: infer[k] for k in ("device", "accuracy", "agreement", "timing", "exit_fractions")}
    # per sample: on CUDA (TF32 convolutions, kernels chosen per batch size) the logits of the
    # engine's smaller batches differ slightly from the offline pass's, so only near ties may move
    policy, logits = FitRun(fit_dir).policy(), TrainRun(train_dir).predictions("test").logits
    exits, engine_syncs = engine_exits(train_dir, policy, device)
    result.update(compare_exits(exits, simulate(policy, logits)[0], near_ties(policy, logits, TIE)))
    result["near_tie_tolerance"] = TIE
    result["engine_syncs_per_batch"] = engine_syncs
    write_result(out, result)  # what the later, longer steps add comes on top of this

    # 4: training throughput, eager and compiled (on the CPU a smoke run on digits, eager only)
    quick = ["--quick"] if args.quick else []
    gpu = (
        ["--device", "cuda", "--precision", "bf16-mixed", "--compile", "--windows", "5", "--window", "5"]
        if device == "cuda"
        else []
    )
    result["train_speed"] = {}
    for backbone in ("resnet20", "resnet56") if device == "cuda" else ("resnet20",):
        result["train_speed"][backbone] = bench(
            "train_speed.py",
            [*quick, *gpu, "--loop-only", "--backbone", backbone],
            out.parent / f"train_speed_cuda_{backbone}.json"
            if device == "cuda"
            else work / f"train_speed_{backbone}.json",
            work / f"train_speed_{backbone}.log",
        )
        write_result(out, result)
    # 5: the engine at batch 128, realised against predicted
    inference = (
        ["--device", "cuda", "--repeats", "10", "--backbones", "cifar_resnet56", "timm_resnet50_224px"]
        if device == "cuda"
        else ["--backbones", "cifar_resnet56"]
    )
    result["inference_speed"] = bench(
        "inference_speed.py",
        [*quick, *inference, "--batch-sizes", "128"],
        out.parent / "inference_speed_cuda.json" if device == "cuda" else work / "inference_speed.json",
        work / "inference_speed.log",
    )
    write_result(out, result)
    # 6: syncs per training step
    result["step_syncs"] = bench(
        "step_overhead.py",
        [
            *quick,
            "--device",
            device,
            "--phases",
            "syncs",
            "--methods",
            "joint",
            "bilevel",
            *(["--precision", "bf16-mixed"] if device == "cuda" else []),
        ],
        out.parent / "step_overhead_cuda.json" if device == "cuda" else work / "step_overhead.json",
        work / "step_overhead.log",
    )
    result["acceptance"] = acceptance(result)
    write_result(out, result)


if __name__ == "__main__":
    main()
