"""Budget-aware (bi-level) vs joint training on a converged schedule, several seeds.

Every method trains the same network (ResNet-20 with an exit after each group) on the same data,
schedule and augmentation, once per seed, through ``eenn-train`` (one process per run, ``--jobs``
at a time, each on ``--threads`` threads). A finished run is reused when the benchmark is started
again with the same work dir, so a long benchmark can be stopped and resumed.

On each run's saved predictions, the paper's protocol (budgeted batch classification): MSDNet's
maxprob thresholds and EENet's scheduler are fitted on the validation split at ``--budgets``
budgets spread evenly between the first exit's cost and the full cost (both excluded), then
evaluated on the test split; the test split is only reported, never used to choose anything.
Besides: anytime accuracy per exit (test), the learning curve (validation accuracy per exit and
epoch) and, for bi-level runs, the gater's diagnostics per epoch (mean A^k, the expected cost
under A, the share of samples whose largest A^k is each exit, lambda).

Writes ``benchmarks/results/budget_aware.json`` (per seed, and mean / std over seeds, and the paired
difference of every method to joint) and ``budget_aware.png``.

    python benchmarks/budget_aware.py                  # 3 seeds x joint, bilevel, bilevel_paper, 60 epochs (hours)
    python benchmarks/budget_aware.py --methods joint bilevel --seeds 0 1 2 --jobs 2
    python benchmarks/budget_aware.py --quick          # seconds: digits, 1 seed, 2 epochs (the slow tests' smoke run)

``--method NAME=OVERRIDES`` adds a variant (e.g. ``--method 'lam05=training=bilevel training.cost_weight=0.5'``).
``--run NAME=RUN_DIR`` (repeatable) trains nothing: it evaluates finished ``eenn-train`` runs made
elsewhere (a cluster, an earlier sweep) under the same protocol, each a seed of method NAME.
An interrupted training resumes from its ``last.ckpt`` when the benchmark is started again.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from common import add_output_args, output_path  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from eenn.evaluation.offline import evaluate  # noqa: E402
from eenn.policies import build_policy  # noqa: E402
from eenn.predictions import Predictions  # noqa: E402
from eenn.rundir import Stage1Run  # noqa: E402
from eenn.tasks.fit import sweep_fractions  # noqa: E402
from eenn.utils.io import write_json  # noqa: E402
from eenn.utils.overrides import override  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "budget_aware.json"
CIFAR10_SMALL = Path(os.environ.get("EENN_SHARED", REPO.parent / "shared")) / "datasets" / "cifar10_small.npz"
METHODS = {
    "joint": "training=joint",
    "bilevel": "training=bilevel",
    "bilevel_paper": "training=bilevel_paper",
}
POLICIES = ("maxprob", "eenet")


def train_command(overrides: list[str], run_dir: Path) -> list[str]:
    # an interrupted training continues from its last checkpoint (ckpt_path=last needs one)
    resume = ["ckpt_path=last"] if (Stage1Run(run_dir).checkpoint_dir / "last.ckpt").is_file() else []
    return [sys.executable, "-m", "eenn.cli.train", *overrides, "logger=csv", "cost.latency=false",
            "trainer.enable_progress_bar=false", *resume, override("hydra.run.dir", run_dir)]


def run_training(name: str, overrides: list[str], run_dir: Path, threads: int) -> None:
    """Train one run in its own process (skipped when ``run_dir`` holds this finished run)."""
    if Stage1Run(run_dir).finished():
        if set(overrides) <= set(read_overrides(run_dir)):
            return
        raise SystemExit(f"{run_dir} holds a finished run of other settings; give another --workdir.")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    log = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.run(train_command(overrides, run_dir), cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"training {name} failed (exit {proc.returncode}); see {log}")


def read_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def given_runs(specs: list[str]) -> tuple[dict[tuple[str, int], Path], list[int], int, str]:
    """``--run NAME=RUN_DIR`` values: the finished runs by (method, seed), the seeds (every method
    must have each), the epochs and the data they were trained for (the first run's)."""
    runs: dict[tuple[str, int], Path] = {}
    epochs, data = 0, ""
    for spec in specs:
        name, sep, path = spec.partition("=")
        run = Stage1Run(path)
        if not sep or not run.finished():
            raise SystemExit(f"--run {spec!r}: expected NAME=RUN_DIR with a finished eenn-train run in RUN_DIR.")
        cfg = run.config()
        runs[name, int(cfg.seed)] = run.path
        source = Path(str(cfg.data.path)).stem if cfg.data.get("path") else str(cfg.data.name)  # npz: its file
        epochs, data = epochs or int(cfg.trainer.max_epochs), data or source
    seeds = sorted({sd for _, sd in runs})
    for name in dict.fromkeys(m for m, _ in runs):
        missing = [sd for sd in seeds if (name, sd) not in runs]
        if missing:
            raise SystemExit(f"--run: method {name!r} has no run for seed(s) {missing}; every method needs every seed.")
    return runs, seeds, epochs, data


def budget_fractions(preds: Predictions, n: int) -> list[float]:
    """``n`` budgets evenly spaced strictly between the first exit's cost and the full cost."""
    return sweep_fractions(preds.costs_in("flops"), n + 2)[1:-1]


def budget_curves(run_dir: Path, fractions: list[float]) -> dict[str, Any]:
    """Per policy: accuracy on test (and on val, where it was fitted) and realised test cost."""
    val, test = Stage1Run(run_dir).predictions("val"), Stage1Run(run_dir).predictions("test")
    full = float(val.costs_in("flops")[-1])
    out: dict[str, Any] = {}
    for name in POLICIES:
        rows = {"test": [], "val": [], "test_cost": []}
        for f in fractions:
            policy = build_policy(name).fit(val, f * full, "flops")
            t, v = evaluate(policy, test, "flops"), evaluate(policy, val, "flops")
            rows["test"].append(t["accuracy"])
            rows["val"].append(v["accuracy"])
            rows["test_cost"].append(t["avg_cost_fraction"])
        out[name] = rows
    out["anytime_test"] = test.accuracy_per_exit().tolist()
    out["anytime_val"] = val.accuracy_per_exit().tolist()
    return out


def epoch_log(run_dir: Path, exit_keys: list[str]) -> dict[str, Any]:
    """Learning curve and gater diagnostics per epoch from the run's CSV log."""
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    by_epoch: dict[int, dict[str, float]] = {}
    for r in rows:
        if not r.get("epoch"):  # the test metrics, logged once after training
            continue
        e = by_epoch.setdefault(int(r["epoch"]), {})
        e.update({k: float(v) for k, v in r.items() if v not in ("", None) and k not in ("epoch", "step")})
    # an epoch without validation metrics is a test pass's row (runs of eenn before it logged test
    # metrics from the predictions)
    epochs = sorted(e for e in by_epoch if f"val/acc/{exit_keys[-1]}" in by_epoch[e])
    out: dict[str, Any] = {"epoch": epochs,
                           "val_acc": [[by_epoch[e].get(f"val/acc/{k}") for k in exit_keys] for e in epochs]}
    if any("train/exit_prob/" + exit_keys[0] in by_epoch[e] for e in epochs):
        out["gater"] = {
            "mean_a": [[by_epoch[e].get(f"train/exit_prob/{k}") for k in exit_keys] for e in epochs],
            "top_exit_share": [[by_epoch[e].get(f"train/top_exit/{k}") for k in exit_keys] for e in epochs],
            "expected_cost": [by_epoch[e].get("train/expected_cost") for e in epochs],
            "cost_weight": [by_epoch[e].get("train/cost_weight") for e in epochs],
        }
    return out


def mean_std(values: list[list[float]]) -> dict[str, list[float]]:
    cols = list(zip(*values))
    return {"mean": [statistics.fmean(c) for c in cols],
            "std": [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols]}


def summarise(per_run: dict[str, dict[int, dict[str, Any]]], seeds: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for method, runs in per_run.items():
        s: dict[str, Any] = {}
        for p in POLICIES:
            for split in ("test", "val"):
                s[f"{p}_{split}"] = mean_std([runs[sd]["curves"][p][split] for sd in seeds])
        s["anytime_test"] = mean_std([runs[sd]["curves"]["anytime_test"] for sd in seeds])
        if method != "joint" and "joint" in per_run:
            for p in POLICIES:
                for split in ("test", "val"):
                    diffs = [[a - b for a, b in zip(runs[sd]["curves"][p][split], per_run["joint"][sd]["curves"][p][split])]
                             for sd in seeds]
                    s[f"{p}_{split}_minus_joint"] = mean_std(diffs)
            s["anytime_test_minus_joint"] = mean_std(
                [[a - b for a, b in zip(runs[sd]["curves"]["anytime_test"], per_run["joint"][sd]["curves"]["anytime_test"])]
                 for sd in seeds])
        summary[method] = s
    return summary


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    x = result["budget_fractions"]
    for method, s in result["summary"].items():
        for p, style in zip(POLICIES, ("-", "--")):
            m, sd = s[f"{p}_test"]["mean"], s[f"{p}_test"]["std"]
            line, = axes[0].plot(x, [100 * v for v in m], style, marker="o", label=f"{method} · {p}")
            axes[0].fill_between(x, [100 * (a - b) for a, b in zip(m, sd)], [100 * (a + b) for a, b in zip(m, sd)],
                                 color=line.get_color(), alpha=0.12)
    axes[0].set(xlabel="budget (fraction of the full model's FLOPs)", ylabel="test accuracy (%)",
                title=f"budgeted batch classification, mean ± std of {len(result['seeds'])} seeds")
    axes[0].legend(fontsize=7)
    for method, runs in result["runs"].items():
        curves = [r["epochs"]["val_acc"] for r in runs.values()]
        epochs = next(iter(runs.values()))["epochs"]["epoch"]
        final = [statistics.fmean(c[i][-1] for c in curves) for i in range(len(epochs))]
        axes[1].plot([e + 1 for e in epochs], [100 * v for v in final], label=method)
        gaters = [r["epochs"].get("gater") for r in runs.values() if r["epochs"].get("gater")]
        if gaters:
            cost = [statistics.fmean(g["expected_cost"][i] for g in gaters) for i in range(len(epochs))]
            axes[2].plot([e + 1 for e in epochs], cost, label=method)
    axes[1].set(xlabel="epoch", ylabel="final exit, validation accuracy (%)", title="learning curve (mean over seeds)")
    axes[1].legend(fontsize=7)
    axes[2].set(xlabel="epoch", ylabel="E_A[Cost] (fraction of the full cost)", title="gater: expected cost under A")
    if axes[2].lines:
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--method", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="an extra method: its name and its eenn-train overrides")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=60, help="60: where the final exit's val accuracy stops rising")
    parser.add_argument("--budgets", type=int, default=6)
    parser.add_argument("--data", default=None, help="a conf/data preset (default: cifar10_small if present, else digits)")
    parser.add_argument("--override", action="append", default=[], help="an eenn-train override for every run")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training")
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_budget_aware")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="evaluate this finished run as a seed of method NAME instead of training")
    add_output_args(parser)
    args = parser.parse_args()
    methods = {m: METHODS[m] for m in args.methods}
    methods.update(dict(m.split("=", 1) for m in args.method))
    data = args.data or ("cifar10_small" if CIFAR10_SMALL.is_file() else "digits")
    seeds, epochs, workdir = args.seeds, args.epochs, args.workdir
    extra = list(args.override)
    out_path = output_path(args, OUT)
    if args.quick:  # digits, seed 0, 2 epochs of 4 batches, 2 budgets, runs beside the JSON
        data, seeds, epochs, workdir = "digits", [0], 2, out_path.parent / "runs"
        extra += ["trainer.limit_train_batches=4"]
        args.budgets = 2
        methods = {m: o for m, o in methods.items() if m != "bilevel_paper"}
    if data == "cifar10_small":
        extra.append(override("data.path", CIFAR10_SMALL))
    t0 = time.perf_counter()

    def overrides(method: str, seed: int) -> list[str]:
        return [*shlex.split(methods[method]), override("data", data), "backbone=resnet20", "exits=stages",
                override("trainer.max_epochs", epochs), override("seed", seed), *extra]

    if args.run:
        run_dirs, seeds, epochs, data = given_runs(args.run)
        jobs = list(run_dirs)
        methods = {m: "" for m, _ in jobs}
    else:
        jobs = [(m, sd) for sd in seeds for m in methods]  # seed-major: every method's seed 0 finishes first
        run_dirs = {(m, sd): workdir / f"{m}_s{sd}" for m, sd in jobs}
        with ThreadPoolExecutor(args.jobs) as pool:  # list(): a failed training stops the benchmark here
            list(pool.map(lambda j: run_training(f"{j[0]} seed {j[1]}", overrides(*j), run_dirs[j], args.threads), jobs))

    first = Stage1Run(run_dirs[jobs[0]]).predictions("val")
    fractions = budget_fractions(first, args.budgets)
    exit_keys = [n.replace(".", "_") for n in first.exit_names]
    per_run: dict[str, dict[int, dict[str, Any]]] = {}
    for method, seed in jobs:
        run_dir = run_dirs[method, seed]
        metrics = Stage1Run(run_dir).metrics()
        per_run.setdefault(method, {})[seed] = {
            "run_dir": str(run_dir), "overrides": read_overrides(run_dir), "train_seconds": metrics["train_seconds"],
            "curves": budget_curves(run_dir, fractions), "epochs": epoch_log(run_dir, exit_keys)}
    result = {
        "dataset": data, "backbone": "resnet20", "exits": first.exit_names, "epochs": epochs, "seeds": seeds,
        "methods": methods, "budget_fractions": fractions,
        "exit_cost_fractions": (first.costs_in("flops") / first.costs_in("flops")[-1]).tolist(),
        "protocol": "thresholds (maxprob: MSDNet's rule; eenet: EENet's scheduler) fitted on validation at each budget, "
                    "accuracy reported on test; nothing is chosen on test",
        "summary": summarise(per_run, seeds),
        "runs": per_run,
        "total_seconds": time.perf_counter() - t0,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "jobs": args.jobs, "threads_per_job": args.threads},
    }
    write_json(out_path, result)
    plot(result, out_path.with_suffix(".png"))
    print(f"budgets (fraction of full FLOPs): {[round(f, 3) for f in fractions]}")
    for method, s in result["summary"].items():
        for p in POLICIES:
            line = " ".join(f"{100 * m:5.2f}±{100 * d:4.2f}" for m, d in zip(s[f"{p}_test"]["mean"], s[f"{p}_test"]["std"]))
            print(f"{method:14s} {p:8s} test {line}")
            if f"{p}_test_minus_joint" in s:
                d = s[f"{p}_test_minus_joint"]
                print(f"{'':14s} {'':8s} -joint {' '.join(f'{100 * m:+5.2f}±{100 * e:4.2f}' for m, e in zip(d['mean'], d['std']))}")
    print(f"-> {out_path}")


if __name__ == "__main__":
    main()
