"""Bi-level (budget-aware) vs joint training: accuracy under a budget and training throughput.

Both methods train the same backbone on the same data for the same epochs, through ``eenn-train``'s
``train(cfg)`` (``training=joint`` vs ``training=bilevel``, seed 0, so the same initial weights
and batch order). Joint training sums the exits' cross-entropies (MSDNet's loss, the paper's
baseline, and the "+1" term of eq. 4, so both losses have the same scale; ``--joint-loss-weights
uniform`` gives training=joint's default 1/K). Then, on each run's saved predictions, MSDNet's maxprob thresholds are fitted on
the validation split at 5 budgets spread evenly between the first and the last exit's cost
(exclusive) and evaluated on the test split. Throughput: fresh copies of the two modules train
side by side, alternating batch by batch (see :func:`throughput`); the ratio of their training
samples per second is the median over windows of batches.

Writes ``benchmarks/results/bilevel_vs_joint.json``. Data: ``../shared/datasets/cifar10_small.npz``
(``data=cifar10_small``, JPEG-decoded CIFAR-10 subset) when present, else the bundled digits.

    .venv/bin/python benchmarks/bilevel_vs_joint.py [--epochs 4] [--backbone resnet20]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from eenn.cli.common import conf_dir  # noqa: E402
from eenn.cost import profile_costs  # noqa: E402
from eenn.evaluation.offline import evaluate  # noqa: E402
from eenn.policies import build_policy  # noqa: E402
from eenn.rundir import Stage1Run  # noqa: E402
from eenn.tasks.train import build_network, train  # noqa: E402
from eenn.utils.config import instantiate  # noqa: E402
from eenn.utils.io import write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "bilevel_vs_joint.json"
CIFAR10_SMALL = Path(os.environ.get("EENN_SHARED", REPO.parent / "shared")) / "datasets" / "cifar10_small.npz"
METHODS = ("joint", "bilevel")


def make_cfg(method: str, data: str, backbone: str, epochs: int, run_dir: Path, extra: list[str] = ()) -> DictConfig:
    overrides = [f"training={method}", f"data={data}", f"backbone={backbone}", "exits=stages", "logger=csv",
                 f"trainer.max_epochs={epochs}", "cost.latency=false", "trainer.enable_progress_bar=false", "seed=0",
                 *extra]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.root_dir = str(REPO)
    return cfg


def budget_curve(run_dir: Path, fractions: list[float]) -> tuple[list[float], list[float]]:
    """Test accuracy and realised test cost (fraction of the last exit's) of maxprob at each budget."""
    val, test = Stage1Run(run_dir).predictions("val"), Stage1Run(run_dir).predictions("test")
    full = float(val.costs[-1])
    accs, costs = [], []
    for f in fractions:
        policy = build_policy("maxprob").fit(val, f * full, "flops")
        result = evaluate(policy, test, "flops")
        accs.append(result["accuracy"])
        costs.append(result["avg_cost_fraction"])
    return accs, costs


class TakeTurns(pl.Callback):
    """Times one method's training steps (forward, backward, optimiser steps; no data loading)
    while handing the CPU to the other method after every batch: the two fits run in two threads
    that strictly alternate, so load from other jobs on the machine hits both alike."""

    def __init__(self, name: str, other: str, turn: dict[str, Any], cond: threading.Condition) -> None:
        self.name, self.other, self.turn, self.cond = name, other, turn, cond
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn["now"] in (self.name, None))
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.seconds.append(time.perf_counter() - self.start)
        self._pass(self.other)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._pass(None)  # finished: whoever is left runs freely

    def _pass(self, to: str | None) -> None:
        with self.cond:
            if self.turn["now"] is not None:
                self.turn["now"] = to
            self.cond.notify_all()


def throughput(cfgs: dict[str, DictConfig], windows: int, window: int) -> dict[str, Any]:
    """Training samples per second of bilevel over joint: both fits alternate batch by batch for
    ``windows + 1`` windows of ``window`` batches (a multiple of the gater interval, so each
    window holds its share of gater steps); window 0 warms up and is dropped; the ratio is the
    median over windows of joint's time over bilevel's (both process the same samples)."""
    dm = instantiate(cfgs["joint"].data, _convert_="all")
    dm.setup("fit")
    turn, cond = {"now": METHODS[0]}, threading.Condition()
    timers, fits = {}, []
    for i, (method, cfg) in enumerate(cfgs.items()):
        pl.seed_everything(0)
        net = build_network(cfg, dm)
        costs = profile_costs(net, dm.input_shape, latency=False)
        module = instantiate(cfg.training, network=net, num_classes=dm.num_classes, cost_profile=costs, _convert_="all")
        timers[method] = TakeTurns(method, METHODS[1 - i], turn, cond)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=(windows + 1) * window,
                             limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[timers[method]])
        fits.append(threading.Thread(target=trainer.fit, args=(module,), kwargs={"train_dataloaders": dm.train_dataloader()}))
    for f in fits:
        f.start()
    for f in fits:
        f.join()
    per_window = {m: [sum(t.seconds[w * window:(w + 1) * window]) for w in range(1, windows + 1)] for m, t in timers.items()}
    ratios = [j / b for j, b in zip(per_window["joint"], per_window["bilevel"])]
    return {"ratio": statistics.median(ratios), "window_ratios": ratios,
            "samples_per_s": {m: window * dm.batch_size / statistics.median(v) for m, v in per_window.items()},
            "windows": windows, "batches_per_window": window, "batch_size": dm.batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--data", default=None, help="a conf/data preset (default: cifar10_small if present, else digits)")
    parser.add_argument("--joint-loss-weights", default="sum",
                        help="sum: CE summed over exits (MSDNet's joint loss, the paper's baseline and the '+1' "
                             "term of eq. 4, so both losses have the same scale); or any training.loss_weights value")
    parser.add_argument("--throughput-windows", type=int, default=5)
    parser.add_argument("--throughput-window", type=int, default=10, help="batches; a multiple of training.gater_every")
    parser.add_argument("--bilevel-overrides", nargs="*", default=[], help="e.g. training.cost_weight=0.5")
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_bilevel_vs_joint")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    data = args.data or ("cifar10_small" if CIFAR10_SMALL.is_file() else "digits")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    load_before = os.getloadavg()[0]  # other jobs on the machine distort timings: recorded
    t0 = time.perf_counter()

    weights = args.joint_loss_weights
    if weights == "sum":  # one weight per exit: build the network once to count them
        probe = make_cfg("joint", data, args.backbone, args.epochs, args.workdir / "joint")
        dm = instantiate(probe.data, _convert_="all")
        weights = "[" + ",".join(["1.0"] * build_network(probe, dm).num_exits) + "]"
    cfgs = {"joint": make_cfg("joint", data, args.backbone, args.epochs, args.workdir / "joint",
                              [f"training.loss_weights={weights}"]),
            "bilevel": make_cfg("bilevel", data, args.backbone, args.epochs, args.workdir / "bilevel",
                                args.bilevel_overrides)}
    metrics = {m: train(cfg) for m, cfg in cfgs.items()}
    costs = metrics["joint"]["costs_flops"]
    assert costs == metrics["bilevel"]["costs_flops"], "both methods must train the same network"
    first = costs[0] / costs[-1]
    fractions = [first + (1 - first) * i / 6 for i in range(1, 6)]
    curves = {m: budget_curve(args.workdir / m, fractions) for m in METHODS}
    speed = throughput(cfgs, args.throughput_windows, args.throughput_window)

    result = {
        "dataset": data,
        "backbone": args.backbone,
        "epochs": args.epochs,
        "joint_loss_weights": weights,
        "bilevel_overrides": args.bilevel_overrides,
        "exit_names": metrics["joint"]["exit_names"],
        "exit_cost_fractions": [c / costs[-1] for c in costs],
        "budget_fractions": fractions,  # of the last exit's FLOPs
        "joint": curves["joint"][0],
        "bilevel": curves["bilevel"][0],
        "joint_realised_cost": curves["joint"][1],
        "bilevel_realised_cost": curves["bilevel"][1],
        "joint_static": list(metrics["joint"]["test_accuracy"].values()),
        "bilevel_static": list(metrics["bilevel"]["test_accuracy"].values()),
        "throughput_ratio": speed["ratio"],
        "throughput": speed,
        "train_seconds": {m: metrics[m]["train_seconds"] for m in METHODS},
        "total_seconds": time.perf_counter() - t0,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "load_avg_before": load_before,
                    "load_avg_after": os.getloadavg()[0]},
    }
    write_json(args.out, result)
    print(f"budget fractions {[round(f, 3) for f in fractions]}")
    for m in METHODS:
        print(f"{m:8s} budgeted {[round(a, 4) for a in result[m]]}  static {[round(a, 4) for a in result[m + '_static']]}")
    print(f"throughput bilevel/joint {speed['ratio']:.3f}  -> {args.out}")


if __name__ == "__main__":
    main()
