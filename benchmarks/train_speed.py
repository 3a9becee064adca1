"""Training-loop speed: eenn-train's steady-state images/s against plain PyTorch loops.

Contestants train the same network (eenn's own ``build_multi_exit``, the same initial weights) on
the same images, batch size, optimiser (SGD, Nesterov momentum, the config's LR and weight decay)
and augmentation (pad-4 random crop + horizontal flip):

- ``eenn``: the Lightning module, datamodule, callbacks, logger and Trainer of ``eenn-train``,
  built from the real config as ``train()`` builds them (per-exit metrics, logging, checkpoint
  and RNG callbacks, progress bar: everything a step pays for in a real run).
- ``plain``: the loop a PyTorch user writes first: torchvision per-sample transforms in a
  DataLoader (``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``Normalize``), the
  network in its default memory format, no metrics.
- ``plain_tuned``: the same loop given eenn's speed-ups (whole-batch augmentation, channels-last):
  what is left between it and ``eenn`` is the framework's own overhead.

For ``bilevel`` the plain loops run the same two-optimiser step as eenn's module (theta every
batch through A, the gater every ``gater_every`` batches); for ``soft_threshold`` the same
allocation (a budget drawn per batch, the deployed rule's soft exits) weighting the same loss.

With ``--compile``, two more contestants: ``eenn_compiled`` (``training.compile=true``) and
``plain_tuned_compiled`` (plain_tuned's network through ``torch.compile``); both compile in a
warm-up pass before the timed loops start (weights and batch-norm statistics restored after it),
and the JSON gives each one's speed over its eager self and eenn_compiled's over plain_tuned_compiled.

The contestants run side by side in one process, in threads that strictly take turns window by
window (``--window`` batches, data loading included), so load from other jobs on the machine hits
them alike; the first window warms up and is dropped; images/s per contestant and the ratio
eenn/plain per window are reported as medians. Besides: eenn's time to the first step (from
``train(cfg)`` to its first batch) and its end-of-run time (last batch to ``train`` returning:
test pass, predictions, metrics), from a short real ``train()`` call, and the import time of
``eenn.tasks.train`` in a fresh interpreter.

Writes ``benchmarks/results/train_speed.json``.

    python benchmarks/train_speed.py                      # ~10 min on 2 CPU cores
    python benchmarks/train_speed.py --device cuda --precision bf16-mixed
    python benchmarks/train_speed.py --compile --methods joint   # + the torch.compile contestants
    python benchmarks/train_speed.py --quick              # seconds: the smoke run of the slow tests
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import add_output_args, compose_cfg, output_path, write_result  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from eenn.cost import profile_costs  # noqa: E402
from eenn.data.augment import BatchAugment  # noqa: E402
from eenn.tasks.build import instantiate  # noqa: E402
from eenn.tasks.train import build_module, build_network, instantiate_group, train  # noqa: E402
from eenn.training.gater import Gater  # noqa: E402
from eenn.training.soft_threshold import (  # noqa: E402
    fractions_for_budget,
    geometric_fractions_table,
    soft_exit_distribution,
)
from eenn.utils.overrides import override  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "train_speed.json"
CIFAR10_SMALL = Path(os.environ.get("EENN_SHARED", REPO.parent / "shared")) / "datasets" / "cifar10_small.npz"


def make_cfg(
    method: str, data: str, out: Path, device: str, precision: str, extra: list[str], backbone: str = "resnet20"
) -> DictConfig:
    overrides = [
        override("training", method),
        override("data", data),
        override("backbone", backbone),
        "exits=stages",
        "logger=csv",
        "cost.latency=false",
        override("trainer.accelerator", device),
        override("trainer.precision", precision),
        "seed=0",
        *extra,
    ]
    cfg = compose_cfg("train", overrides, out)
    with open_dict(cfg):
        if data == "cifar10_small":
            cfg.data.path = str(CIFAR10_SMALL)
    return cfg


class Turns:
    """Threads that run one at a time, in a fixed rotation, a window each."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.now, self.cond = names, names[0], threading.Condition()
        self.done: set[str] = set()
        self.seconds: dict[str, list[float]] = {n: [] for n in names}

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.now == name)

    def passed(self, name: str, seconds: float) -> None:
        self.seconds[name].append(seconds)
        self._next(name)

    def finish(self, name: str) -> None:
        with self.cond:
            self.done.add(name)
        self._next(name)

    def _next(self, name: str) -> None:
        with self.cond:
            live = [n for n in self.names if n not in self.done]
            if live:
                i = self.names.index(name)
                self.now = next(
                    self.names[(i + j) % len(self.names)]
                    for j in range(1, len(self.names) + 1)
                    if self.names[(i + j) % len(self.names)] in live
                )
            self.cond.notify_all()


class WindowTimer(pl.Callback):
    """eenn's side: a window is ``window`` batches from one on_train_batch_start to the one
    ``window`` batches later (loading, step, hooks, logging, progress bar all inside)."""

    def __init__(self, turns: Turns, window: int, name: str = "eenn") -> None:
        self.turns, self.window, self.name, self.start = turns, window, name, None

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % self.window == 0:
            if self.start is not None:
                self.turns.passed(self.name, time.perf_counter() - self.start)
            self.turns.wait(self.name)
            self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.turns.passed(self.name, time.perf_counter() - self.start)
        self.turns.finish(self.name)


def warm_up_compiled(
    forward: Callable[[torch.Tensor], torch.Tensor], net: torch.nn.Module, x: torch.Tensor, precision: str
) -> None:
    """Compile ``forward`` (and its backward) on a training batch ``x``, then restore ``net``'s
    weights and batch-norm statistics and drop its gradients."""
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16")):
        forward(x).float().sum().backward()
    net.zero_grad(set_to_none=True)
    net.load_state_dict(state)


class TextbookTransform(Dataset):
    """uint8 images through torchvision's per-sample CIFAR transforms."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean: list[float], std: list[float]) -> None:
        self.x, self.y = x, y
        self.tf = v2.Compose(
            [
                v2.RandomCrop(x.shape[-1], padding=4),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tf(self.x[i]), self.y[i]


def plain_batches(
    name: str, dm: Any, batches: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches of a plain loop, augmented the textbook way or eenn's way."""
    x, y = dm.train_set.x, dm.train_set.y
    mean_l, std_l = dm.normalisation
    g = torch.Generator().manual_seed(0)
    if name == "plain":
        loader = DataLoader(
            TextbookTransform(x, y, mean_l, std_l), batch_size=dm.batch_size, shuffle=True, drop_last=True, generator=g
        )
        for i, (xb, yb) in enumerate(loader):
            if i == batches:
                return
            yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        return
    aug = BatchAugment(mean_l, std_l, crop_padding=4, flip=True).to(device)
    loader = DataLoader(list(zip(x, y)), batch_size=dm.batch_size, shuffle=True, drop_last=True, generator=g)
    for i, (xb, yb) in enumerate(loader):
        if i == batches:
            return
        yield aug(xb.to(device, non_blocking=True)), yb.to(device, non_blocking=True)


def plain_loop(
    name: str,
    method: str,
    cfg: DictConfig,
    dm: Any,
    turns: Turns,
    batches: int,
    window: int,
    device: torch.device,
    precision: str,
) -> Callable[[], None]:
    """A plain PyTorch training loop (joint: mean of the exits' CE; bilevel: eq. 4 then eq. 10)."""
    pl.seed_everything(0)
    net = build_network(cfg, dm).to(device)
    if name.startswith("plain_tuned"):
        net = net.to(memory_format=torch.channels_last)
    forward: Callable[[torch.Tensor], torch.Tensor] = net
    if name.endswith("_compiled"):
        forward = torch.compile(net)
        xb = next(plain_batches(name, dm, 1, device))[0]
        warm_up_compiled(forward, net, xb, precision)
    o = cfg.training.optimizer
    opt = torch.optim.SGD(
        net.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
    )
    gater = gater_opt = costs = None
    if method == "bilevel":
        t = cfg.training
        gater = Gater(net.num_exits, list(t.features), t.gater_hidden, t.gater_shared).to(device)
        gater_opt = torch.optim.Adam(gater.parameters(), lr=t.gater_optimizer.lr)
        c = torch.tensor(profile_costs(net, dm.input_shape, latency=False).per_exit("flops"), device=device)
        costs = c / c[-1]
    table = None
    if method == "soft_threshold":
        c = torch.tensor(profile_costs(net, dm.input_shape, latency=False).per_exit("flops"))
        costs = (c / c[-1]).float()
        table = tuple(t.to(device) for t in geometric_fractions_table(costs))
        low = float(costs[0]) if cfg.training.budget_range is None else cfg.training.budget_range[0]
        high = 1.0 if cfg.training.budget_range is None else cfg.training.budget_range[1]
    autocast = precision.startswith("bf16")

    def run() -> None:
        net.train()
        start = None
        for i, (x, y) in enumerate(plain_batches(name, dm, batches, device)):
            if i % window == 0:
                if start is not None:
                    turns.passed(name, time.perf_counter() - start)
                turns.wait(name)
                start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = forward(x)
                b, k, c = logits.shape
                ce = F.cross_entropy(logits.float().reshape(b * k, c), y.repeat_interleave(k), reduction="none").view(
                    b, k
                )
                if table is not None:  # SoftThresholdTraining's loss, written out
                    with torch.no_grad():
                        budget = low + (high - low) * torch.rand((), device=device)
                        pi = fractions_for_budget(budget, table).float()
                        a = soft_exit_distribution(
                            torch.softmax(logits.detach().float(), -1).amax(-1), pi, cfg.training.softness
                        )
                    loss = ((a + 1) / (k + 1) * ce).sum(1).mean()
                elif gater is None:
                    loss = ce.mean(0).mean()
                else:
                    gater.requires_grad_(False)
                    through = (
                        cfg.training.grad_through_gater
                    )  # as eenn's module: A detached unless eq. 11's gradient is on
                    a = gater.exit_distribution(
                        (logits if through else logits.detach()).float(), cfg.training.temperature
                    )
                    loss = ((a + 1) * (ce + cfg.training.cost_weight * costs)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if gater is not None and (i + 1) % cfg.training.gater_every == 0:
                gater.requires_grad_(True)
                a = gater.exit_distribution(logits.detach().float(), cfg.training.temperature)
                gater_loss = ((ce.detach() + cfg.training.cost_weight * costs) * a).sum(1).mean()
                gater_opt.zero_grad()
                gater_loss.backward()
                gater_opt.step()
        turns.passed(name, time.perf_counter() - start)
        turns.finish(name)

    return run


def eenn_contestant(
    name: str, cfg: DictConfig, dm: Any, turns: Turns, batches: int, window: int, precision: str
) -> Callable[[], None]:
    """eenn-train's Trainer and module for ``cfg`` (compiled, warmed up, for ``eenn_compiled``)."""
    pl.seed_everything(0)
    net = build_network(cfg, dm)
    module = build_module(cfg, net, dm.num_classes, profile_costs(net, dm.input_shape, latency=False))
    if module.compiled is not None:
        device = torch.device("cuda" if cfg.trainer.accelerator == "cuda" else "cpu")
        module.to(device)
        xb = dm.train_batch_transform(next(iter(dm.train_dataloader()))[0].to(device))
        warm_up_compiled(lambda x: module.train_forward(x), net, xb, precision)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        logger=instantiate_group(cfg.get("logger")) or False,
        callbacks=[*instantiate_group(cfg.get("callbacks")), WindowTimer(turns, window, name)],
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    return lambda: trainer.fit(module, datamodule=dm)


#: (faster, slower?) pairs whose speed ratio the JSON gives, when both ran
RATIOS = [
    ("eenn", "plain"),
    ("eenn", "plain_tuned"),
    ("eenn_compiled", "eenn"),
    ("plain_tuned_compiled", "plain_tuned"),
    ("eenn_compiled", "plain_tuned_compiled"),
]


def throughput(
    method: str,
    data: str,
    windows: int,
    window: int,
    device: str,
    precision: str,
    tmp: Path,
    extra: list[str],
    compile: bool = False,
    backbone: str = "resnet20",
) -> dict[str, Any]:
    cfg = make_cfg(method, data, tmp / f"speed_{method}", device, precision, extra, backbone)
    batches = (windows + 1) * window
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    if len(dm.train_set) < batches * dm.batch_size:
        raise SystemExit(f"{batches} batches of {dm.batch_size} need more than the {len(dm.train_set)} training images")
    names = ["eenn", "plain", "plain_tuned", *(["eenn_compiled", "plain_tuned_compiled"] if compile else [])]
    turns = Turns(names)
    torch_device = torch.device("cuda" if device == "cuda" else "cpu")

    runs = {"eenn": eenn_contestant("eenn", cfg, dm, turns, batches, window, precision)}
    if compile:
        compiled_cfg = make_cfg(
            method,
            data,
            tmp / f"speed_{method}_compiled",
            device,
            precision,
            [*extra, "training.compile=true"],
            backbone,
        )
        runs["eenn_compiled"] = eenn_contestant("eenn_compiled", compiled_cfg, dm, turns, batches, window, precision)
    runs.update(
        {
            n: plain_loop(n, method, cfg, dm, turns, batches, window, torch_device, precision)
            for n in names
            if n.startswith("plain")
        }
    )
    threads = [threading.Thread(target=runs[n], name=n) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = {n: s[1 : windows + 1] for n, s in turns.seconds.items()}  # window 0 warms up
    images = window * dm.batch_size
    out: dict[str, Any] = {"images_per_s": {n: images / statistics.median(s) for n, s in seconds.items()}}
    for a, b in RATIOS:
        if a in seconds and b in seconds:
            ratios = [tb / ta for ta, tb in zip(seconds[a], seconds[b])]
            out[f"{a}_over_{b}"] = statistics.median(ratios)
            out[f"{a}_over_{b}_per_window"] = ratios
    out["window_seconds"] = seconds
    return out


class FirstLast(pl.Callback):
    def __init__(self) -> None:
        self.first = self.last = None

    def on_train_batch_start(self, *args: Any) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.last = time.perf_counter()


def start_and_end(
    method: str, data: str, device: str, precision: str, tmp: Path, extra: list[str], backbone: str = "resnet20"
) -> dict[str, float]:
    """eenn-train's fixed costs around the loop: time to the first step and after the last one."""
    cfg = make_cfg(
        method,
        data,
        tmp / f"run_{method}",
        device,
        precision,
        [*extra, "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.enable_progress_bar=false"],
        backbone,
    )
    probe = FirstLast()
    with open_dict(cfg):
        cfg.callbacks.first_last = {"_target_": f"{__name__}.FirstLast"}
    import eenn.tasks.train as run_mod

    original = run_mod.instantiate_group

    def with_probe(group: Any) -> list[Any]:  # hand train() our probe instance instead of a new one
        return [probe if isinstance(c, FirstLast) else c for c in original(group)]

    run_mod.instantiate_group = with_probe
    try:
        t0 = time.perf_counter()
        train(cfg)
        t1 = time.perf_counter()
    finally:
        run_mod.instantiate_group = original
    return {"to_first_step_s": probe.first - t0, "after_last_step_s": t1 - probe.last}


def import_seconds() -> float:
    code = "import time; t = time.perf_counter(); import eenn.tasks.train; print(time.perf_counter() - t)"
    return float(
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        ).stdout.strip()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["joint", "bilevel"])
    parser.add_argument("--windows", type=int, default=7, help="timed windows per contestant (after one warm-up)")
    parser.add_argument(
        "--window",
        type=int,
        default=7,
        help="batches per window (a multiple of gater_every); (windows + 1) x window batches must fit in one epoch",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed on a GPU")
    parser.add_argument("--override", action="append", default=[], help="a train config override for every run")
    parser.add_argument(
        "--compile", action="store_true", help="add the torch.compile contestants (eenn_compiled, plain_tuned_compiled)"
    )
    parser.add_argument("--backbone", default="resnet20", help="a conf/backbone config (resnet20, resnet56, ...)")
    parser.add_argument(
        "--loop-only", action="store_true", help="time the loops only (no start/end run, no import time)"
    )
    add_output_args(parser)
    args = parser.parse_args()
    if args.quick:
        data, windows, window = "digits", 2, 2
        extra = [*args.override, "data.batch_size=32"]
    else:
        data = "cifar10_small" if CIFAR10_SMALL.is_file() else "digits"
        windows, window, extra = args.windows, args.window, args.override
    out_path = output_path(args, OUT)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {
        "dataset": data,
        "backbone": args.backbone,
        "exits": "stages",
        "device": args.device,
        "precision": args.precision,
        "windows": windows,
        "batches_per_window": window,
        "overrides": extra,
        "compile": args.compile,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            speed = throughput(
                method,
                data,
                windows,
                window,
                args.device,
                args.precision,
                Path(tmp),
                extra,
                args.compile,
                args.backbone,
            )
            if not args.loop_only:
                speed.update(start_and_end(method, data, args.device, args.precision, Path(tmp), extra, args.backbone))
            result[method] = speed
            print(
                f"{method:8s} images/s "
                + "  ".join(f"{n} {v:.0f}" for n, v in speed["images_per_s"].items())
                + f"  | eenn/plain {speed['eenn_over_plain']:.3f}  eenn/plain_tuned "
                f"{speed['eenn_over_plain_tuned']:.3f}"
                + (
                    ""
                    if args.loop_only
                    else f"  | first step after {speed['to_first_step_s']:.1f} s, "
                    f"{speed['after_last_step_s']:.1f} s after the last"
                )
                + "".join(
                    f"  | {a}/{b} {speed[f'{a}_over_{b}']:.3f}" for a, b in RATIOS[2:] if f"{a}_over_{b}" in speed
                )
            )
    if not args.loop_only:
        result["import_seconds"] = import_seconds()
    result["machine"] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg()[0],
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }
    write_result(out_path, result)
    print(f"-> {out_path}")


if __name__ == "__main__":
    main()
