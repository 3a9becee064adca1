"""Per-step framework overhead: eenn's training step against plain_tuned on a model so small that
the framework's share shows.

ResNet-20 with 3 exits on ``data=digits`` (8x8 images) at batch 8, on 1 CPU thread: a step of
tens of milliseconds, most of it per-op dispatch, as on a GPU where the kernels are quick. Three
phases, each a fresh Trainer and a fresh plain loop, every phase for ``--methods`` (joint,
bilevel, soft_threshold):

1. **time**: eenn-train's step (Lightning module, datamodule, callbacks, CSV logger, progress bar:
   ``benchmarks/train_speed.py``'s ``eenn``) and ``plain_tuned`` (the plain PyTorch loop with eenn's
   whole-batch augmentation and channels-last, the same optimiser, loss and gater steps), side by
   side in one process, taking turns window by window; the first window warms up. The overhead
   is eenn's window time minus plain_tuned's, per step, median over windows, with the median's
   distribution-free 95 % interval: ``--rounds`` fresh pairs, their windows pooled (one round of
   ~80 steps moved the median by ±10 points from run to run; digits has room for no more).
2. **parts**: the same, with every part of a step timed by wrappers in thread CPU time (exclusive times: a part
   called inside another counts once): data loading, augmentation, forward, backward, optimiser
   step, per-exit metrics, ``self.log``, the progress bar, Lightning's logger connector; what is
   left is the loop (Lightning's loop and hooks, or the plain loop's own code) and the loss
   arithmetic. The share of
   each part is its eenn-minus-plain time over the sum of the parts' differences.
3. **syncs**: eenn's steps under :class:`eenn.utils.syncs.SyncCounter` (on the CPU: ``.item()``,
   ``bool()``, ``float()``, ``.cpu()``, ``.tolist()``, ``nonzero``, ... in the step path, with
   where each was called), per step from one batch start to the next, after the first window.

On a GPU (``--device cuda``) the syncs are PyTorch's own count (``torch.cuda.set_sync_debug_mode``).

Writes ``benchmarks/results/step_overhead.json``.

    python benchmarks/step_overhead.py             # ~4 min on a quiet core, ~15 min on busy ones
    python benchmarks/step_overhead.py --quick     # seconds: the smoke run of the slow tests
    python benchmarks/step_overhead.py --device cuda --phases syncs --methods joint bilevel   # gpu_check.py's
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from common import add_output_args, output_path, write_result  # noqa: E402
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar  # noqa: E402
from lightning.pytorch.loops.optimization.automatic import Closure  # noqa: E402
from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector  # noqa: E402
from train_speed import Turns, WindowTimer, make_cfg, plain_loop  # noqa: E402

from eenn.cost import profile_costs  # noqa: E402
from eenn.data.augment import BatchAugment  # noqa: E402
from eenn.data.datamodule import EENNDataModule  # noqa: E402
from eenn.evaluation.stats import median_interval  # noqa: E402
from eenn.models.multi_exit import MultiExitNetwork  # noqa: E402
from eenn.tasks.build import instantiate  # noqa: E402
from eenn.tasks.train import build_module, build_network, instantiate_group  # noqa: E402
from eenn.training.joint import MultiExitModule  # noqa: E402
from eenn.utils.overrides import override  # noqa: E402
from eenn.utils.syncs import SyncCounter  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "step_overhead.json"
CONTESTANTS = ["eenn", "plain_tuned"]


class CpuTurns(Turns):
    """:class:`Turns` that also records each window's CPU time in the contestant's thread."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.cpu_seconds: dict[str, list[float]] = {n: [] for n in names}
        self.cpu_start: dict[str, float] = {}

    def wait(self, name: str) -> None:
        super().wait(name)
        self.cpu_start[name] = time.thread_time()

    def passed(self, name: str, seconds: float) -> None:
        self.cpu_seconds[name].append(time.thread_time() - self.cpu_start[name])
        super().passed(name, seconds)


#: (owner, method, part): what the parts phase times, for both contestants where both call it
PARTS: list[tuple[Any, str, str]] = [
    (torch.utils.data.dataloader._BaseDataLoaderIter, "__next__", "data loading"),
    (EENNDataModule, "on_after_batch_transfer", "augmentation"),
    (BatchAugment, "forward", "augmentation"),
    (MultiExitNetwork, "forward", "forward"),
    (torch.Tensor, "backward", "backward"),
    (torch.optim.SGD, "step", "optimiser"),
    (torch.optim.Adam, "step", "optimiser"),
    (pl.LightningModule, "log", "self.log"),
    (pl.LightningModule, "log_dict", "self.log"),
    (TQDMProgressBar, "on_train_batch_start", "progress bar"),
    (TQDMProgressBar, "on_train_batch_end", "progress bar"),
    (RichProgressBar, "on_train_batch_start", "progress bar"),
    (RichProgressBar, "on_train_batch_end", "progress bar"),
    (_LoggerConnector, "on_batch_end", "logger connector"),
    (_LoggerConnector, "update_train_step_metrics", "logger connector"),
]
#: the rest: Lightning's loop and hooks, or the plain loop's own code, and the loss arithmetic
REST = "loop, hooks and loss arithmetic"


def module_parts() -> list[tuple[Any, str, str]]:
    """The module's per-exit metric updates, under whichever name this version of eenn has them;
    and the code Lightning runs inside the optimiser's step (its closure: training_step, backward),
    which would otherwise count as the optimiser's."""
    metrics = [
        (MultiExitModule, n, "per-exit metrics") for n in ("_update", "accumulate") if n in vars(MultiExitModule)
    ]
    return [*metrics, (Closure, "closure", REST)]


class PartTimer:
    """Exclusive seconds per (contestant thread, window, part) while wrappers are installed."""

    def __init__(self, turns: CpuTurns) -> None:
        self.turns = turns
        self.seconds: dict[str, dict[int, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
        self.stack: dict[str, list[float]] = defaultdict(list)  # per thread: time spent in nested parts
        self.saved: list[tuple[Any, str, Any]] = []

    def wrap(self, fn: Callable[..., Any], part: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            who = threading.current_thread().name
            stack = self.stack[who]
            stack.append(0.0)
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.thread_time() - t0
                inner = stack.pop()
                if stack:
                    stack[-1] += spent
                window = len(self.turns.seconds.get(who, ()))
                self.seconds[who][window][part] += spent - inner

        return timed

    def __enter__(self) -> PartTimer:
        for owner, name, part in [*PARTS, *module_parts()]:
            self.saved.append((owner, name, owner.__dict__.get(name)))
            setattr(owner, name, self.wrap(getattr(owner, name), part))
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, original in reversed(self.saved):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


class StepSyncs(pl.Callback):
    """Syncs per training step (batch start to the next batch start), after ``skip`` batches."""

    def __init__(self, counter: SyncCounter, skip: int) -> None:
        self.counter, self.skip = counter, skip
        self.steps: list[tuple[int, Counter[str]]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        where = self.counter.take()
        if batch_idx > self.skip:
            self.steps.append((batch_idx - 1, where))


def build(method: str, cfg: Any, batches: int, callbacks: list[pl.Callback]) -> tuple[pl.Trainer, Any, Any]:
    """eenn's Trainer, module and datamodule as ``eenn-train`` builds them, for ``batches`` steps."""
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    pl.seed_everything(0)
    net = build_network(cfg, dm)
    module = build_module(cfg, net, dm.num_classes, profile_costs(net, dm.input_shape, latency=False))
    trainer = instantiate(
        cfg.trainer,
        logger=instantiate_group(cfg.get("logger")) or False,
        callbacks=[*instantiate_group(cfg.get("callbacks")), *callbacks],
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    return trainer, module, dm


def side_by_side(method: str, cfg: Any, windows: int, window: int, timer: bool, device: str = "cpu") -> dict[str, Any]:
    """Phase 1 (``timer`` false) or 2: eenn and plain_tuned taking turns; seconds per window, and
    with ``timer`` the parts' exclusive seconds per step."""
    batches = (windows + 1) * window
    turns = CpuTurns(CONTESTANTS)
    # one batch more: the last timed window ends at a batch start, not after the epoch-end checkpoint
    trainer, module, dm = build(method, cfg, batches + 1, [WindowTimer(turns, window)])
    if len(dm.train_set) < batches * dm.batch_size:
        raise SystemExit(f"{batches} batches of {dm.batch_size} need more than the {len(dm.train_set)} training images")
    runs = {
        "eenn": lambda: trainer.fit(module, datamodule=dm),
        "plain_tuned": plain_loop(
            "plain_tuned", method, cfg, dm, turns, batches, window, torch.device(device), cfg.trainer.precision
        ),
    }
    parts = PartTimer(turns) if timer else contextlib.nullcontext()
    with parts, open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # the progress bar draws to nowhere
        threads = [threading.Thread(target=runs[n], name=n) for n in CONTESTANTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    seconds = {n: s[1 : windows + 1] for n, s in turns.seconds.items()}  # window 0 warms up
    cpu = {n: s[1 : windows + 1] for n, s in turns.cpu_seconds.items()}
    out: dict[str, Any] = {"window_seconds": seconds, "window_cpu_seconds": cpu}
    if timer:
        steps = windows * window
        out["parts_us_per_step"] = {}
        for n in CONTESTANTS:
            total: Counter[str] = Counter()
            for w in range(1, windows + 1):
                total.update(parts.seconds[n][w])
            per_step = {p: 1e6 * s / steps for p, s in sorted(total.items())}
            per_step[REST] = 1e6 * sum(cpu[n]) / steps - sum(v for p, v in per_step.items() if p != REST)
            out["parts_us_per_step"][n] = per_step
    return out


def count_syncs(method: str, cfg: Any, windows: int, window: int, cuda: bool = False) -> dict[str, Any]:
    """Phase 3: eenn's syncs per step, after the first window."""
    batches = (windows + 1) * window
    counter = SyncCounter(cuda=cuda)
    probe = StepSyncs(counter, skip=window)
    trainer, module, dm = build(method, cfg, batches + 1, [probe])
    with counter, open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        trainer.fit(module, datamodule=dm)
    counts = [sum(w.values()) for _, w in probe.steps]
    where: Counter[str] = Counter()
    for _, w in probe.steps:
        where.update(w)
    return {
        "steps": len(counts),
        "per_step_mean": statistics.fmean(counts),
        "per_step_median": statistics.median(counts),
        "per_step_max": max(counts),
        "steps_with_syncs": [i for i, w in probe.steps if w],
        "log_every_n_steps": trainer.log_every_n_steps,
        "where": dict(where.most_common()),
    }


def pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Phase 1's rounds as one: each contestant's windows, round after round."""
    return {
        key: {n: [w for r in rounds for w in r[key][n]] for n in CONTESTANTS}
        for key in ("window_seconds", "window_cpu_seconds")
    }


def overhead(timing: dict[str, Any], key: str, window: int) -> dict[str, Any]:
    """eenn's time per step over plain_tuned's in the windows' ``key`` seconds (wall or CPU)."""
    eenn, plain = timing[key]["eenn"], timing[key]["plain_tuned"]
    ratio = [(e - p) / p for e, p in zip(eenn, plain)]
    median, low, high = median_interval(ratio)
    return {
        "step_ms": {
            "eenn": 1e3 * statistics.median(eenn) / window,
            "plain_tuned": 1e3 * statistics.median(plain) / window,
        },
        "overhead_us_per_step": 1e6 * statistics.median((e - p) / window for e, p in zip(eenn, plain)),
        "overhead_pct_of_plain_step": 100 * median,
        "overhead_pct_ci95": [100 * low, 100 * high],
        "overhead_pct_per_window": [100 * r for r in ratio],
    }


def summarise(timing: dict[str, Any], parts: dict[str, Any], window: int) -> dict[str, Any]:
    pe, pp = parts["parts_us_per_step"]["eenn"], parts["parts_us_per_step"]["plain_tuned"]
    diff = {p: pe.get(p, 0.0) - pp.get(p, 0.0) for p in sorted(set(pe) | set(pp))}
    total = sum(diff.values())
    return {
        "cpu": overhead(timing, "window_cpu_seconds", window),
        "wall": overhead(timing, "window_seconds", window),
        "overhead_by_part_us_per_step": diff,
        "overhead_share_pct": {p: 100 * d / total for p, d in diff.items()} if total > 0 else None,
        "timing": timing,
        "parts": parts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["joint", "bilevel", "soft_threshold"])
    parser.add_argument("--windows", type=int, default=9, help="timed windows per contestant (after one warm-up)")
    parser.add_argument("--window", type=int, default=8, help="batches per window")
    parser.add_argument("--rounds", type=int, default=20, help="fresh pairs timed in phase 1, windows pooled")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed on a GPU")
    parser.add_argument(
        "--phases",
        nargs="+",
        default=["time", "syncs"],
        choices=["time", "syncs"],
        help="time: phases 1 and 2 (time, parts); syncs: phase 3",
    )
    parser.add_argument("--override", action="append", default=[], help="a train config override for every run")
    add_output_args(parser)
    args = parser.parse_args()
    windows, window, rounds = (2, 2, 2) if args.quick else (args.windows, args.window, args.rounds)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    result: dict[str, Any] = {
        "dataset": "digits",
        "backbone": "resnet20",
        "exits": "stages",
        "batch_size": args.batch_size,
        "threads": args.threads,
        "windows": windows,
        "batches_per_window": window,
        "rounds": rounds,
        "overrides": args.override,
        "device": args.device,
        "precision": args.precision,
        "phases": args.phases,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            extra = [override("data.batch_size", args.batch_size), *args.override]
            cfg = make_cfg(method, "digits", Path(tmp) / method, args.device, args.precision, extra)
            row: dict[str, Any] = {}
            if "time" in args.phases:
                timing = pooled([side_by_side(method, cfg, windows, window, False, args.device) for _ in range(rounds)])
                parts = side_by_side(method, cfg, windows, window, timer=True, device=args.device)
                row = summarise(timing, parts, window)
                for clock in ("cpu", "wall"):
                    c = row[clock]
                    print(
                        f"{method:15s} {clock:4s} step eenn {c['step_ms']['eenn']:.2f} ms, plain_tuned "
                        f"{c['step_ms']['plain_tuned']:.2f} ms; overhead {c['overhead_us_per_step']:.0f} us/step = "
                        f"{c['overhead_pct_of_plain_step']:.1f} % [{c['overhead_pct_ci95'][0]:.1f}, "
                        f"{c['overhead_pct_ci95'][1]:.1f}] of plain_tuned's step"
                    )
                share = row["overhead_share_pct"] or {}
                print(f"{'':15s} " + ", ".join(f"{p} {s:.0f} %" for p, s in sorted(share.items(), key=lambda t: -t[1])))
            if "syncs" in args.phases:
                row["syncs"] = count_syncs(method, cfg, windows, window, cuda=args.device == "cuda")
                print(
                    f"{method:15s} syncs/step {row['syncs']['per_step_mean']:.2f} (max {row['syncs']['per_step_max']})"
                )
            result[method] = row
    result["machine"] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
    }
    out = output_path(args, OUT)
    write_result(out, result)
    print(f"-> {out} (load average {load_before[0]:.1f} before, {result['machine']['load_avg_after'][0]:.1f} after)")


if __name__ == "__main__":
    main()
