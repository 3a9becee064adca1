"""Peak memory of eenn-fit on large predictions files (issue 13): the peak resident set of one
``eenn-fit`` child process, per policy, as a multiple of one split's file size. The target is
at most 2.5x: the predictions are memory-mapped and every pass over them goes in row chunks.
Writes benchmarks/results/fit_memory.json.

    python benchmarks/fit_memory.py                    # 100,000 x 5 x 1,000: two 1.86 GiB files (~3 min quiet)
    python benchmarks/fit_memory.py --samples 20000    # a smaller file, the same ratio's story
    python benchmarks/fit_memory.py --quick            # 2,000 x 5 x 10: a smoke run

The peak is the child's VmHWM, read by the child as it exits: it counts the mapped file pages the
fit has touched as well as its own allocations. (Not the parent's ru_maxrss from wait4: Linux
carries the parent's resident size at fork into the child's, and this parent held the files.) The same fit on a
100-sample file gives the process's
fixed size (Python, torch, Hydra, Lightning: about 1.3 GB here), reported as ``base_rss_bytes``: on small
files it dominates the ratio, which is why the target is read at full size. EENet trains for ``--eenet-epochs``
epochs only: its
memory peaks in the first, and 500 full-batch epochs on 100,000 x 1,000 would take an hour.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from common import add_output_args, output_path, write_result  # noqa: E402

from eenn.predictions import Predictions  # noqa: E402
from eenn.rundir import FitRun  # noqa: E402
from eenn.utils.overrides import override  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "fit_memory.json"
TARGET_RATIO = 2.5


def write_predictions(folder: Path, n: int, k: int, c: int, chunk: int = 10_000) -> int:
    """Synthetic val and test files of n x k x c logits (later exits more confident and more often
    right), built in row chunks so that this process stays small; returns one file's size."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, c, (n,), generator=g)
    sharp = torch.linspace(0.5, 6.0, k)
    for split in ("val", "test"):
        logits = torch.empty(n, k, c)
        for a in range(0, n, chunk):
            block = torch.randn(min(chunk, n - a), k, c, generator=g)
            block[torch.arange(len(block)), :, labels[a : a + chunk]] += sharp
            logits[a : a + chunk] = block
        Predictions(
            logits=logits, labels=labels, costs=torch.arange(1, k + 1, dtype=torch.float64) * 1e9, split=split
        ).save(folder / f"{split}.safetensors")
        del logits
    return (folder / "val.safetensors").stat().st_size


# eenn-fit, run as its console script runs it, writing its own peak resident size (VmHWM) on exit
RUN_FIT = """import atexit, runpy, sys
out = sys.argv.pop(1)
def peak():
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
    open(out, "w").write(str(int(hwm.split()[1]) * 1024))
atexit.register(peak)
runpy.run_module("eenn.cli.fit", run_name="__main__")
"""


def fit_peak(folder: Path, policy: str, overrides: list[str]) -> dict:
    """Run eenn-fit on the two files in ``folder`` in a child process; its peak resident memory."""
    out, peak = folder / f"fit_{policy}", folder / f"{policy}.peak"
    cmd = [
        sys.executable,
        "-c",
        RUN_FIT,
        str(peak),
        override("predictions.val", folder / "val.safetensors"),
        override("predictions.test", folder / "test.safetensors"),
        override("policy", policy),
        "budget.fraction=0.5",
        override("hydra.run.dir", out),
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    with open(folder / f"{policy}.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=log, env=env).returncode
    ok = code == 0 and FitRun(out).finished()
    return {
        "policy": policy,
        "overrides": overrides,
        "completed": ok,
        "peak_rss_bytes": int(peak.read_text()),
        "seconds": round(time.perf_counter() - t0, 1),
        "log_tail": "" if ok else (folder / f"{policy}.log").read_text()[-2000:],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--exits", type=int, default=5)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--policies", nargs="+", default=["maxprob", "eenet"])
    ap.add_argument("--eenet-epochs", type=int, default=3)
    ap.add_argument(
        "--tmp", type=Path, default=None, help="where the two predictions files go (default: the system's temp dir)"
    )
    add_output_args(ap)
    args = ap.parse_args()
    results = output_path(args, RESULTS)
    if args.quick:
        args.samples, args.classes = 2000, 10
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        large, small = Path(d) / "large", Path(d) / "small"
        large.mkdir()
        small.mkdir()
        split_bytes = write_predictions(large, args.samples, args.exits, args.classes)
        write_predictions(small, 100, args.exits, args.classes)
        fits = []
        for policy in args.policies:
            overrides = [override("policy.max_epochs", args.eenet_epochs)] if policy == "eenet" else []
            fit = fit_peak(large, policy, overrides)
            base = fit_peak(small, policy, overrides)["peak_rss_bytes"]
            fit["base_rss_bytes"] = base
            fit["peak_over_split"] = round(fit["peak_rss_bytes"] / split_bytes, 3)
            fit["growth_over_split"] = round((fit["peak_rss_bytes"] - base) / split_bytes, 3)
            fit["within_target"] = fit["completed"] and fit["peak_over_split"] <= TARGET_RATIO
            fits.append(fit)
    out = {
        "samples": args.samples,
        "exits": args.exits,
        "classes": args.classes,
        "split_bytes": split_bytes,
        "split_gib": round(split_bytes / 2**30, 3),
        "target_peak_over_split": TARGET_RATIO,
        "fits": fits,
        "machine": {
            "cpus": os.cpu_count(),
            "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        },
    }
    write_result(results, out)
    print(json.dumps(out, indent=2))
    if not all(f["completed"] for f in fits):
        sys.exit(1)


if __name__ == "__main__":
    main()
