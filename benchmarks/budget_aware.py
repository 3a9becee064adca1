"""Budget-aware training against a tuned joint baseline: every arm tuned alike, five seeds, the
full CIFAR-10 test set, confidence intervals.

Arms (ResNet-20 with an exit after each group, one schedule, one augmentation, one dataset):

- ``joint``: uniform exit weights (the baseline every other arm is paired with);
- ``bilevel_norm``: bi-level training at joint's loss scale (``training.normalize_loss=true``);
- ``permuted``: the same with A shuffled across each batch's samples (the control: scale, exit
  averages and lambda's dynamics kept, the per-sample allocation removed);
- ``mixed``: Kubaty et al.'s mixed regime (the backbone with its final exit first, then all exits);
- ``bilevel_paper``: the bi-level paper's own setting;
- ``soft_threshold``: eq. 4 with A the deployed max-probability rule made soft, at a budget drawn
  per batch (``eenn/training/soft_threshold.py``).

Protocol (the JSON's ``protocol`` says it too):

1. Tuning, on seeds not reported (``--tune-seeds``), four runs per arm: the learning rate from
   ``--lrs`` at the arm's default knob, then one more run: the best learning rate with the knob's
   other value (arms with a knob), or for joint (no knob) one more learning rate beside the best.
   The setting with the best validation score wins; the score is maxprob's validation accuracy
   (thresholds fitted on validation) averaged over the budgets.
2. Final runs: the chosen setting on ``--seeds``. maxprob and eenet are fitted on validation at
   ``--budgets`` budgets spread evenly between the first exit's cost and the full cost (both
   excluded) and reported on the whole test split, with per-exit (anytime) test accuracy. The test
   split chooses nothing.
3. Per arm, policy and budget: mean, std, n and a 95 % t interval over seeds; every arm's paired
   difference to joint (by seed): mean, 95 % t interval, t-test and exact sign-flip p-values,
   and the smallest effect the study could have detected (:mod:`eenn.evaluation.stats`).

Runs are reused only when their resolved config (as the run saved it) equals the one this
benchmark would train now; an interrupted training resumes from its last checkpoint. Each run's
resolved config and the commit it trained on (from its metrics) go into the JSON.

    python benchmarks/budget_aware.py --stage tune        # 24 runs (hours): the tuning
    python benchmarks/budget_aware.py --stage final       # 30 runs: the chosen settings x 5 seeds
    python benchmarks/budget_aware.py                     # both, then the JSON and the plot
    python benchmarks/budget_aware.py --stage curve       # the learning-curve check: the chosen settings at 2x epochs
    python benchmarks/budget_aware.py --quick             # seconds: digits, tiny grids (the slow tests' smoke run)

``--run NAME=RUN_DIR`` (repeatable) trains nothing: it evaluates finished ``eenn-train`` runs made
elsewhere under the same protocol, each a seed of arm NAME.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from common import REPO, add_output_args, compose_cfg, output_path, write_result  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from eenn.configs import config_differences, resolved_config  # noqa: E402
from eenn.evaluation.offline import evaluate  # noqa: E402
from eenn.evaluation.stats import paired_difference, summarise  # noqa: E402
from eenn.policies import build_policy  # noqa: E402
from eenn.policies.budget import sweep_fractions  # noqa: E402
from eenn.predictions import Predictions  # noqa: E402
from eenn.rundir import TrainRun  # noqa: E402
from eenn.utils.io import write_json  # noqa: E402
from eenn.utils.overrides import override  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "budget_aware.json"
POLICIES = ("maxprob", "eenet")
LR_KEY = "training.optimizer.lr"
#: what may differ between a run's saved config and this benchmark's without making it another run
MAY_CHANGE = ("paths", "logger", "ckpt_path", "force", "resume", "trainer.enable_progress_bar", "hydra")
#: the parts of a run's resolved config that define what it trained (recorded per run)
TRAINED = ("training", "data", "backbone", "exits", "trainer", "seed")


@dataclass(frozen=True)
class Arm:
    overrides: str
    knob: str | None = None  # a config key, tuned over its default and one other value
    knob_values: tuple[Any, ...] = ()  # (default, alternative)


ARMS: dict[str, Arm] = {
    "joint": Arm("training=joint"),
    "bilevel_norm": Arm("training=bilevel training.normalize_loss=true", "training.budget", (0.55, 0.75)),
    "permuted": Arm(
        "training=bilevel training.normalize_loss=true training.permute_allocation=true",
        "training.budget",
        (0.55, 0.75),
    ),
    "mixed": Arm("training=mixed", "training.warmup_epochs", ("half", "quarter")),
    "bilevel_paper": Arm("training=bilevel_paper", "training.cost_weight", (2.0, 0.5)),
    "soft_threshold": Arm("training=soft_threshold", "training.softness", (0.25, 1.0)),
}


def knob_override(arm: Arm, value: Any, epochs: int) -> list[str]:
    if arm.knob is None:
        return []
    if arm.knob == "training.warmup_epochs":  # the mixed regime's first phase, a share of the epochs
        value = max(1, round(epochs * {"half": 0.5, "quarter": 0.25}[value]))
    return [override(arm.knob, value)]


def setting_name(arm: str, lr: float, knob: Any) -> str:
    return f"{arm}_lr{lr:g}" + (f"_{str(knob).replace('.', 'p')}" if knob is not None else "")


# ------------------------------------------------------------------------------------ training
class Study:
    """Where the runs go and how they are trained: one process per run, ``jobs`` at a time."""

    def __init__(self, args: argparse.Namespace, data: list[str], epochs: int) -> None:
        self.workdir, self.jobs, self.threads, self.data, self.epochs = (
            args.workdir,
            args.jobs,
            args.threads,
            data,
            epochs,
        )
        self.extra = list(args.override)
        self.report_only = args.stage == "report"  # trains nothing: every run must be there

    def overrides(self, arm: str, lr: float, knob: Any, seed: int, epochs: int | None = None) -> list[str]:
        e = epochs or self.epochs
        return [
            *shlex.split(ARMS[arm].overrides),
            *knob_override(ARMS[arm], knob, e),
            override(LR_KEY, lr),
            *self.data,
            "backbone=resnet20",
            "exits=stages",
            override("trainer.max_epochs", e),
            override("seed", seed),
            "logger=csv",
            "cost.latency=false",
            "trainer.enable_progress_bar=false",
            *self.extra,
        ]

    def expected_config(self, overrides: list[str], run_dir: Path) -> dict[str, Any]:
        cfg = compose_cfg("train", overrides, run_dir)
        return resolved_config(cfg, run_dir)

    def check_same(self, overrides: list[str], run_dir: Path) -> None:
        """A run dir holding another config than the one this benchmark trains is refused (its
        results would be read as this setting's)."""
        run = TrainRun(run_dir)
        if not run.has_config():
            return
        saved = OmegaConf.to_container(OmegaConf.load(run.config_file))
        differ = config_differences(saved, self.expected_config(overrides, run_dir), MAY_CHANGE)
        if differ:
            raise SystemExit(
                f"{run_dir} holds a run of another config ({differ}); remove it or give another --workdir."
            )

    def train(self, name: str, overrides: list[str], run_dir: Path) -> None:
        """Train (or resume) one run; :meth:`train_all` checked its dir (composing a config is not
        thread-safe: every check runs before the pool starts)."""
        run = TrainRun(run_dir)
        if run.finished():
            return
        resume = ["ckpt_path=last"] if run.last_checkpoint.is_file() else []
        force = ["force=true"] if run_dir.exists() and not resume else []  # an attempt that never saved a checkpoint
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
            "WANDB_MODE": "disabled",
        }
        log = run_dir.parent / f"{run_dir.name}.log"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "eenn.cli.train", *overrides, *resume, *force, override("hydra.run.dir", run_dir)]
        with open(log, "a") as fh:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise SystemExit(f"training {name} failed (exit {proc.returncode}); see {log}")

    def train_all(self, todo: list[tuple[str, list[str], Path]]) -> None:
        for _, overrides, run_dir in todo:  # every refusal before the first training starts
            self.check_same(overrides, run_dir)
        if self.report_only:
            missing = [str(d) for _, _, d in todo if not TrainRun(d).finished()]
            if missing:
                raise SystemExit(f"--stage report trains nothing, and {len(missing)} run(s) are missing: {missing[:3]}")
            return
        with ThreadPoolExecutor(self.jobs) as pool:  # list(): a failed training stops the benchmark here
            list(pool.map(lambda t: self.train(*t), todo))


# ---------------------------------------------------------------------------------- evaluation
def budget_fractions(preds: Predictions, n: int) -> list[float]:
    """``n`` budgets evenly spaced strictly between the first exit's cost and the full cost."""
    return sweep_fractions(preds.costs_in("flops"), n + 2)[1:-1]


def budget_curves(run_dir: Path, fractions: list[float], policies: tuple[str, ...], cache_dir: Path) -> dict[str, Any]:
    """Per policy: accuracy on test and on val (where it was fitted) and realised test cost; the
    anytime accuracy per exit. Cached beside the runs by the predictions' bytes and the budgets."""
    run = TrainRun(run_dir)
    key = hashlib.sha1(
        json.dumps([fractions, list(policies)]).encode()
        + run.predictions_file("val").read_bytes()[: 1 << 20]
        + run.predictions_file("test").read_bytes()[: 1 << 20]
    ).hexdigest()[:16]
    cache = cache_dir / f"{run_dir.name}.{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    val, test = run.predictions("val"), run.predictions("test")
    full = float(val.costs_in("flops")[-1])
    out: dict[str, Any] = {}
    for name in policies:
        rows: dict[str, list[float]] = {"test": [], "val": [], "test_cost": []}
        for f in fractions:
            policy = build_policy(name).fit(val, f * full, "flops")
            t, v = evaluate(policy, test, "flops"), evaluate(policy, val, "flops")
            rows["test"].append(t["accuracy"])
            rows["val"].append(v["accuracy"])
            rows["test_cost"].append(t["avg_cost_fraction"])
        out[name] = rows
    out["anytime_test"] = test.accuracy_per_exit().tolist()
    out["anytime_val"] = val.accuracy_per_exit().tolist()
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_json(cache, out)
    return out


def epoch_log(run_dir: Path, exit_keys: list[str]) -> dict[str, Any]:
    """Learning curve and gater diagnostics per epoch from the run's CSV log."""
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    by_epoch: dict[int, dict[str, float]] = {}
    for r in rows:
        if not r.get("epoch"):
            continue
        e = by_epoch.setdefault(int(r["epoch"]), {})
        e.update({k: float(v) for k, v in r.items() if v not in ("", None) and k not in ("epoch", "step")})
    epochs = sorted(e for e in by_epoch if f"val/acc/{exit_keys[-1]}" in by_epoch[e])
    out: dict[str, Any] = {
        "epoch": epochs,
        "val_acc": [[by_epoch[e].get(f"val/acc/{k}") for k in exit_keys] for e in epochs],
    }
    if any("train/exit_prob/" + exit_keys[0] in by_epoch[e] for e in epochs):
        out["allocation"] = {
            "mean_a": [[by_epoch[e].get(f"train/exit_prob/{k}") for k in exit_keys] for e in epochs],
            "expected_cost": [by_epoch[e].get("train/expected_cost") for e in epochs],
            "cost_weight": [by_epoch[e].get("train/cost_weight") for e in epochs],
        }
    return out


def run_record(run_dir: Path, fractions: list[float], policies: tuple[str, ...], cache_dir: Path) -> dict[str, Any]:
    """What the JSON keeps of one run: where, which code, what it trained (resolved), its numbers."""
    run = TrainRun(run_dir)
    metrics, saved = run.metrics(), OmegaConf.to_container(OmegaConf.load(run.config_file))
    code = metrics.get("code") or {}
    exit_keys = [n.replace(".", "_") for n in metrics["exit_names"]]
    return {
        "run_dir": str(run_dir),
        "commit": code.get("commit"),
        "dirty": code.get("dirty"),
        "train_seconds": metrics["train_seconds"],
        "config": {k: saved.get(k) for k in TRAINED},
        "curves": budget_curves(run_dir, fractions, policies, cache_dir),
        "epochs": epoch_log(run_dir, exit_keys),
    }


def val_score(curves: dict[str, Any]) -> float:
    """The tuning score: maxprob's validation accuracy averaged over the budgets."""
    v = curves["maxprob"]["val"]
    return sum(v) / len(v)


# ------------------------------------------------------------------------------------- tuning
def next_lr(lrs: list[float], scores: dict[float, float]) -> float:
    """Joint's fourth tuning run: one learning-rate step past the best when it is at an edge of the
    grid, else the geometric midpoint between the best and its better neighbour."""
    grid = sorted(lrs)
    best = max(grid, key=lambda lr: scores[lr])
    i = grid.index(best)
    step = grid[1] / grid[0] if len(grid) > 1 else 2.0
    if i == 0:
        return best / step
    if i == len(grid) - 1:
        return best * step
    nb = max((grid[i - 1], grid[i + 1]), key=lambda lr: scores[lr])
    return math.sqrt(best * nb)


def tune(study: Study, arms: list[str], lrs: list[float], seeds: list[int], n_budgets: int) -> dict[str, Any]:
    """Four runs per arm (see the module docstring); returns the grid, every score and the choice."""
    work = study.workdir / "tune"

    def settings_runs(arm: str, settings: list[tuple[float, Any]]) -> list[tuple[str, list[str], Path]]:
        return [
            (
                f"tune {arm} lr={lr} knob={k} seed {sd}",
                study.overrides(arm, lr, k, sd),
                work / f"{setting_name(arm, lr, k)}_s{sd}",
            )
            for lr, k in settings
            for sd in seeds
        ]

    first = {arm: [(lr, ARMS[arm].knob_values[0] if ARMS[arm].knob else None) for lr in lrs] for arm in arms}
    study.train_all([r for arm in arms for r in settings_runs(arm, first[arm])])
    fractions = None
    scores: dict[str, dict[tuple[float, Any], dict[str, Any]]] = {}

    def score(arm: str, lr: float, k: Any) -> dict[str, Any]:
        nonlocal fractions
        dirs = [work / f"{setting_name(arm, lr, k)}_s{sd}" for sd in seeds]
        if fractions is None:
            fractions = budget_fractions(TrainRun(dirs[0]).predictions("val"), n_budgets)
        recs = [run_record(d, fractions, ("maxprob",), study.workdir / "evals") for d in dirs]
        return {
            "lr": lr,
            "knob": k,
            "val_score": sum(val_score(r["curves"]) for r in recs) / len(recs),
            "runs": [
                {
                    "run_dir": r["run_dir"],
                    "commit": r["commit"],
                    "dirty": r["dirty"],
                    "config": r["config"],
                    "val_score": val_score(r["curves"]),
                }
                for r in recs
            ],
        }

    for arm in arms:
        scores[arm] = {(lr, k): score(arm, lr, k) for lr, k in first[arm]}
    second = {}
    for arm in arms:
        best_lr, best_k = max(scores[arm], key=lambda s: scores[arm][s]["val_score"])
        if ARMS[arm].knob:
            second[arm] = (best_lr, ARMS[arm].knob_values[1])
        else:
            second[arm] = (next_lr(lrs, {lr: scores[arm][lr, k]["val_score"] for lr, k in first[arm]}), None)
    study.train_all([r for arm in arms for r in settings_runs(arm, [second[arm]])])
    for arm in arms:
        scores[arm][second[arm]] = score(arm, *second[arm])
    chosen = {arm: max(scores[arm].values(), key=lambda s: s["val_score"]) for arm in arms}
    return {
        "seeds": seeds,
        "lr_grid": lrs,
        "lr_key": LR_KEY,
        "knobs": {arm: {"key": ARMS[arm].knob, "values": list(ARMS[arm].knob_values)} for arm in arms},
        "runs_per_arm": 1 + len(lrs) if seeds else 0,
        "score": "maxprob's validation accuracy (thresholds fitted on validation), mean over the budgets",
        "results": {arm: list(scores[arm].values()) for arm in arms},
        "chosen": {arm: {"lr": c["lr"], "knob": c["knob"], "val_score": c["val_score"]} for arm, c in chosen.items()},
    }


# ---------------------------------------------------------------------------------- summaries
def summarise_study(runs: dict[str, dict[int, dict[str, Any]]], baseline: str = "joint") -> dict[str, Any]:
    """Per arm: per policy and budget a Summary of test (and val) accuracy over seeds, and the
    paired difference to ``baseline`` over the seeds both have; the same for anytime accuracy."""
    out: dict[str, Any] = {}
    for arm, by_seed in runs.items():
        seeds = sorted(by_seed)
        s: dict[str, Any] = {"seeds": seeds}
        for key in [*(f"{p}_{split}" for p in POLICIES for split in ("test", "val")), "anytime_test"]:
            series = [_series(by_seed[sd]["curves"], key) for sd in seeds]
            if any(x is None for x in series):
                continue
            s[key] = [summarise([x[b] for x in series]).as_dict() for b in range(len(series[0]))]
            if arm != baseline and baseline in runs:
                shared = [sd for sd in seeds if sd in runs[baseline]]
                base = [_series(runs[baseline][sd]["curves"], key) for sd in shared]
                mine = [_series(by_seed[sd]["curves"], key) for sd in shared]
                if shared and all(x is not None for x in base):
                    s[f"{key}_minus_{baseline}"] = [
                        paired_difference([x[b] for x in mine], [x[b] for x in base]).as_dict()
                        for b in range(len(series[0]))
                    ]
        out[arm] = s
    return out


def _series(curves: dict[str, Any], key: str) -> list[float] | None:
    if key == "anytime_test":
        return curves["anytime_test"]
    policy, split = key.rsplit("_", 1)
    return curves.get(policy, {}).get(split)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    x = result["budget_fractions"]
    for arm, s in result["summary"].items():
        if "maxprob_test" not in s:
            continue
        m = [100 * v["mean"] for v in s["maxprob_test"]]
        (line,) = axes[0].plot(x, m, marker="o", label=f"{arm} (n={s['maxprob_test'][0]['n']})")
        color = line.get_color()  # an arm keeps its colour in both panels
        if s["maxprob_test"][0]["ci_low"] is not None:
            axes[0].fill_between(
                x,
                [100 * v["ci_low"] for v in s["maxprob_test"]],
                [100 * v["ci_high"] for v in s["maxprob_test"]],
                color=color,
                alpha=0.12,
            )
        d = s.get("maxprob_test_minus_joint")
        if d:
            axes[1].plot(x, [100 * v["mean"] for v in d], marker="o", label=arm, color=color)
            if d[0]["ci_low"] is not None:
                axes[1].fill_between(
                    x,
                    [100 * v["ci_low"] for v in d],
                    [100 * v["ci_high"] for v in d],
                    color=color,
                    alpha=0.12,
                )
    axes[0].set(
        xlabel="budget (fraction of the full model's FLOPs)",
        ylabel="test accuracy (%)",
        title="maxprob, mean and 95 % CI over seeds",
    )
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set(
        xlabel="budget (fraction of the full model's FLOPs)",
        ylabel="test accuracy - joint (points)",
        title="paired difference to joint, 95 % CI",
    )
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def given_runs(specs: list[str]) -> dict[str, dict[int, Path]]:
    """``--run NAME=RUN_DIR`` values: the finished runs by arm and seed."""
    runs: dict[str, dict[int, Path]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        run = TrainRun(path)
        if not sep or not run.finished():
            raise SystemExit(f"--run {spec!r}: expected NAME=RUN_DIR with a finished eenn-train run in RUN_DIR.")
        runs.setdefault(name, {})[int(run.config().seed)] = run.path
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stage",
        choices=("all", "tune", "final", "curve", "report"),
        default="all",
        help="tune: the tuning runs; final: the chosen settings x --seeds (tunes first if needed); "
        "curve: the chosen settings at --curve-epochs on the tuning seeds; report: the JSON "
        "from the runs there are (trains nothing)",
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--tune-seeds", nargs="+", type=int, default=[100])
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--curve-epochs", type=int, default=24)
    parser.add_argument("--budgets", type=int, default=6)
    parser.add_argument("--train-subset", type=int, default=10000, help="data.train_subset (class-balanced)")
    parser.add_argument("--override", action="append", default=[], help="an eenn-train override for every run")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training")
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_budget_aware_v2")
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="NAME=RUN_DIR",
        help="evaluate this finished run as a seed of arm NAME instead of training",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        metavar="JSON",
        help="print the README's tables from a result JSON and stop (nothing is trained or read)",
    )
    add_output_args(parser)
    args = parser.parse_args()
    if args.markdown:
        result = json.loads(args.markdown.read_text())
        print(markdown(result, "maxprob"))
        print(markdown(result, "eenet").split("\n\nAnytime")[0])
        return
    out_path = output_path(args, OUT)
    data = ["data=cifar10_full", override("data.train_subset", args.train_subset)]
    epochs = args.epochs
    if args.quick:  # digits, 1 tuning seed, 2 lrs, 2 final seeds, 2 epochs of 4 batches, 2 budgets
        data, epochs, args.budgets = ["data=digits"], 2, 2
        args.seeds, args.tune_seeds, args.lrs = [0, 1], [100], [0.05, 0.1]
        args.arms = ["joint", "permuted", "soft_threshold"]
        args.workdir = out_path.parent / "runs"
        args.override = [*args.override, "trainer.limit_train_batches=4"]
    study = Study(args, data, epochs)
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, args.jobs * args.threads))

    if args.run:
        given = given_runs(args.run)
        tuning, seeds = None, sorted({sd for r in given.values() for sd in r})
        final_dirs = {arm: dict(r) for arm, r in given.items()}
    else:
        tuning = tune(study, args.arms, args.lrs, args.tune_seeds, args.budgets)
        if args.stage == "tune":
            print(json.dumps(tuning["chosen"], indent=1))
            return
        chosen = tuning["chosen"]
        if args.stage == "curve":
            curve_runs = [
                (
                    f"curve {arm} seed {sd}",
                    study.overrides(arm, c["lr"], c["knob"], sd, args.curve_epochs),
                    study.workdir / "curve" / f"{setting_name(arm, c['lr'], c['knob'])}_e{args.curve_epochs}_s{sd}",
                )
                for arm, c in chosen.items()
                for sd in args.tune_seeds
            ]
            study.train_all(curve_runs)
        seeds = args.seeds
        final_dirs = {
            arm: {sd: study.workdir / "final" / f"{setting_name(arm, c['lr'], c['knob'])}_s{sd}" for sd in seeds}
            for arm, c in chosen.items()
        }
        if args.stage in ("all", "final"):
            study.train_all(
                [
                    (f"final {arm} seed {sd}", study.overrides(arm, chosen[arm]["lr"], chosen[arm]["knob"], sd), d)
                    for sd in seeds
                    for arm, by_seed in final_dirs.items()
                    for d in [by_seed[sd]]
                ]
            )
        # the seeds that have finished (all of them after --stage all or final)
        final_dirs = {arm: {sd: d for sd, d in r.items() if TrainRun(d).finished()} for arm, r in final_dirs.items()}
        final_dirs = {arm: r for arm, r in final_dirs.items() if r}
        if not final_dirs:
            raise SystemExit("no final run has finished yet: run --stage final first.")

    first = TrainRun(next(d for r in final_dirs.values() for d in r.values())).predictions("val")
    fractions = budget_fractions(first, args.budgets)
    runs = {
        arm: {sd: run_record(d, fractions, POLICIES, study.workdir / "evals") for sd, d in sorted(by_seed.items())}
        for arm, by_seed in final_dirs.items()
    }
    curve = None
    if tuning and (study.workdir / "curve").is_dir():
        curve = learning_curve_check(study, tuning, args, fractions)
    commits = sorted({str(r["commit"]) for by_seed in runs.values() for r in by_seed.values()})
    result = {
        "dataset": data,
        "backbone": "resnet20",
        "exits": first.exit_names,
        "epochs": epochs,
        "seeds": seeds,
        "arms": {arm: ARMS[arm].overrides if arm in ARMS else "given" for arm in runs},
        "budget_fractions": fractions,
        "exit_cost_fractions": (first.costs_in("flops") / first.costs_in("flops")[-1]).tolist(),
        "val_size": first.num_samples,
        "test_size": TrainRun(next(d for r in final_dirs.values() for d in r.values())).predictions("test").num_samples,
        "protocol": (
            "tuning on seeds not reported (tuning.seeds), 4 runs per arm, chosen on validation; thresholds "
            "(maxprob: MSDNet's rule; eenet: EENet's scheduler) fitted on validation at each budget, accuracy "
            "reported on the whole test split; paired differences to joint by seed with 95 % t intervals, "
            "t-test and exact sign-flip p-values; nothing is chosen on test"
        ),
        "tuning": tuning,
        "summary": summarise_study(runs),
        "learning_curve_check": curve,
        "runs": runs,
        "commits": commits,
        "any_dirty": any(r["dirty"] for by_seed in runs.values() for r in by_seed.values()),
        "total_seconds": time.perf_counter() - t0,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "jobs": args.jobs,
            "threads_per_job": args.threads,
        },
    }
    write_result(out_path, result)
    plot(result, out_path.with_suffix(".png"))
    print_summary(result)
    print(f"-> {out_path}")


def learning_curve_check(
    study: Study, tuning: dict[str, Any], args: argparse.Namespace, fractions: list[float]
) -> dict[str, Any]:
    """The chosen settings' validation scores at --epochs (the tuning runs) and at --curve-epochs
    on the tuning seeds, and whether the arms' ranking is the same at both."""
    short, long = {}, {}
    for arm, c in tuning["chosen"].items():
        name = setting_name(arm, c["lr"], c["knob"])
        dirs = [study.workdir / "curve" / f"{name}_e{args.curve_epochs}_s{sd}" for sd in tuning["seeds"]]
        if not all(TrainRun(d).finished() for d in dirs):
            continue
        short[arm] = c["val_score"]
        long[arm] = sum(
            val_score(run_record(d, fractions, ("maxprob",), study.workdir / "evals")["curves"]) for d in dirs
        ) / len(dirs)
    rank = lambda s: sorted(s, key=lambda a: -s[a])  # noqa: E731
    return {
        "epochs": [args.epochs, args.curve_epochs],
        "val_score": {"short": short, "long": long},
        "ranking": {"short": rank(short), "long": rank(long)},
        "same_ranking": rank(short) == rank(long),
    }


def markdown(result: dict[str, Any], policy: str = "maxprob") -> str:
    """The README's tables from a result: test accuracy per arm and budget (mean [95 % CI], n), the
    paired difference to joint with its p-values and verdict, anytime accuracy, and the tuning."""
    f = result["budget_fractions"]
    head = "| arm | n | " + " | ".join(f"{b:.3f}" for b in f) + " |\n|---|---|" + "---|" * len(f) + "\n"
    acc, diff = head, head.replace("| n |", "| n |")
    for arm, s in result["summary"].items():
        if f"{policy}_test" not in s:
            continue
        cells = s[f"{policy}_test"]
        acc += (
            f"| {arm} | {cells[0]['n']} | "
            + " | ".join(
                f"{100 * c['mean']:.2f}"
                + (
                    f" [{100 * c['ci_low']:.2f}, {100 * c['ci_high']:.2f}]"
                    if c["ci_low"] is not None
                    else " (1 seed: no spread)"
                )
                for c in cells
            )
            + " |\n"
        )
        d = s.get(f"{policy}_test_minus_joint")
        if d:
            diff += f"| {arm} − joint | {d[0]['n']} | " + " | ".join(_diff_cell(c) for c in d) + " |\n"
    any_head = (
        "| arm | n | "
        + " | ".join(f"exit {k}" for k in range(len(result["exits"])))
        + " |\n|---|---|"
        + "---|" * len(result["exits"])
        + "\n"
    )
    anytime = any_head
    for arm, s in result["summary"].items():
        if "anytime_test" in s:
            anytime += (
                f"| {arm} | {s['anytime_test'][0]['n']} | "
                + " | ".join(
                    f"{100 * c['mean']:.2f}"
                    + (f" ± {100 * (c['ci_high'] - c['ci_low']) / 2:.2f}" if c["ci_low"] is not None else "")
                    for c in s["anytime_test"]
                )
                + " |\n"
            )
    tuning = ""
    if result.get("tuning"):
        t = result["tuning"]
        tuning = "| arm | tuning runs (lr, knob: val score %) | chosen |\n|---|---|---|\n"
        for arm, runs in t["results"].items():
            c = t["chosen"][arm]
            tried = "; ".join(
                f"{r['lr']:g}" + (f", {r['knob']}" if r["knob"] is not None else "") + f": {100 * r['val_score']:.2f}"
                for r in runs
            )
            tuning += (
                f"| {arm} | {tried} | lr {c['lr']:g}"
                + (f", {t['knobs'][arm]['key']}={c['knob']}" if c["knob"] is not None else "")
                + " |\n"
            )
    return (
        f"Test accuracy (%), {policy}, mean [95 % CI] over seeds:\n\n{acc}\n"
        f"Paired difference to joint (points), mean [95 % CI], t-test p / sign-flip p:\n\n{diff}\n"
        f"Anytime test accuracy per exit (%), mean ± CI half-width:\n\n{anytime}\n{tuning}"
    )


def _diff_cell(c: dict[str, Any]) -> str:
    if c["ci_low"] is None:
        return f"{100 * c['mean']:+.2f} (1 seed: no spread)"
    text = (
        f"{100 * c['mean']:+.2f} [{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}] "
        f"p={c['p_t']:.2g}/{c['p_sign_flip']:.2g}"
    )
    return f"**{text}**" if c["ci_low"] > 0 or c["ci_high"] < 0 else text


def print_summary(result: dict[str, Any]) -> None:
    print(f"budgets (fraction of full FLOPs): {[round(f, 3) for f in result['budget_fractions']]}")
    for arm, s in result["summary"].items():
        for p in POLICIES:
            if f"{p}_test" not in s:
                continue
            print(f"{arm:15s} {p:8s} test " + " ".join(f"{100 * v['mean']:5.2f}" for v in s[f"{p}_test"]))
            d = s.get(f"{p}_test_minus_joint")
            if d:
                print(
                    f"{'':15s} {'':8s} -joint "
                    + " ".join(
                        f"{100 * v['mean']:+5.2f}[{100 * (v['ci_low'] or 0):+.2f},{100 * (v['ci_high'] or 0):+.2f}]"
                        for v in d
                    )
                )


if __name__ == "__main__":
    main()
