"""Policy quality (issue 3's acceptance): the EENet scheduler against MSDNet's maxprob thresholds
and the other heuristics, on the predictions of a multi-exit CIFAR ResNet trained by the spine.

Stage 1 goes through ``eenn-train``'s real code path (``train(cfg)`` on the Hydra configs composed
with ``hydra.compose``: ``data=cifar10_small`` (or digits when ../shared/datasets is absent),
``backbone=resnet20``, the default exits (``exits=stages``: after layer1 and layer2), joint
training, one CPU thread). Stage 2 goes through ``eenn-fit``'s ``fit_run`` on the composed ``fit``
config: ``maxprob``, ``entropy``, ``patience``, ``eenet`` and ``oracle_budget`` (the ceiling), each
fitted on the validation split at 5 budgets evenly spaced strictly between the first and the last
exit's cost (FLOPs, as fractions of the full model's) and evaluated on the test split. Every
policy runs with its config defaults: nothing is tuned on the test split.

The acceptance (EENet paper, Table 1): ``eenet`` >= ``maxprob`` - 0.3 points at every budget and
better than ``maxprob`` at the tightest two.

Writes ``benchmarks/results/policy_quality.json``.

``--eenet-detach`` measures one choice of the EENet scheduler instead (issue 27): the earlier
exits' scores passed on to g_k as constants (``policy.detach_scores=true``, the authors' code and
eenn's default) or with their gradient (``false``, eenn before). Both are fitted at the same 5
budgets with ``--seeds`` scheduler seeds each (``policy.seed``); per budget, the test accuracy and
cost of each and the paired difference true - false over the seeds, with its t interval. Writes
``benchmarks/results/eenet_detach.json``.

    .venv/bin/python benchmarks/policy_quality.py [--epochs 12] [--backbone resnet20]
    .venv/bin/python benchmarks/policy_quality.py --run-dir <stage-1 run dir>   (skips training)
    .venv/bin/python benchmarks/policy_quality.py --run-dir <stage-1 run dir> --eenet-detach [--seeds 3]
    .venv/bin/python benchmarks/policy_quality.py --quick [--eenet-detach]   (digits, 4 batches: a smoke run)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")  # a benchmark: no wandb runs
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402
from common import add_output_args, compose_cfg, output_path, write_result  # noqa: E402

from eenn.evaluation.stats import paired_difference  # noqa: E402
from eenn.rundir import TrainRun  # noqa: E402
from eenn.tasks.fit import fit_run  # noqa: E402
from eenn.tasks.train import train  # noqa: E402
from eenn.utils.overrides import override  # noqa: E402
from eenn.utils.provenance import code_version  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "policy_quality.json"
OUT_DETACH = REPO / "benchmarks" / "results" / "eenet_detach.json"
CIFAR10_SMALL = Path(os.environ.get("EENN_SHARED", REPO.parent / "shared")) / "datasets" / "cifar10_small.npz"
POLICIES = ("maxprob", "entropy", "patience", "eenet", "oracle_budget")
#: the acceptance: eenet may trail maxprob by at most this many points, and must lead at the tightest two budgets
TOLERANCE_POINTS = 0.3
TIGHTEST = 2


def train_stage1(data: str, backbone: str, epochs: int, run_dir: Path, extra: list[str]) -> dict[str, Any]:
    overrides = [
        override("data", data),
        override("backbone", backbone),
        "exits=stages",
        "training=joint",
        "logger=csv",
        override("trainer.max_epochs", epochs),
        "trainer.accelerator=cpu",
        "cost.latency=false",
        "trainer.enable_progress_bar=false",
        "seed=0",
        *extra,
    ]
    metrics = train(compose_cfg("train", overrides, run_dir))
    metrics["overrides"] = overrides
    return metrics


def fit(run_dir: Path, policy: str, fraction: float, out: Path, extra: list[str]) -> dict[str, Any]:
    return fit_run(
        compose_cfg(
            "fit",
            [override("run_dir", run_dir), override("policy", policy), override("budget.fraction", fraction), *extra],
            out,
        ),
        out,
    )


def acceptance(acc: dict[str, list[float]]) -> dict[str, Any]:
    """eenet - maxprob in points at every budget (tightest first), and whether the criterion holds."""
    diff = [100 * (e - m) for e, m in zip(acc["eenet"], acc["maxprob"])]
    within = all(d >= -TOLERANCE_POINTS for d in diff)
    better = all(d > 0 for d in diff[:TIGHTEST])
    return {
        "eenet_minus_maxprob_points": diff,
        "within_tolerance_everywhere": within,
        "better_at_tightest_two": better,
        "holds": within and better,
        "criterion": f"eenet >= maxprob - {TOLERANCE_POINTS} points at every budget and > maxprob at the "
        f"tightest {TIGHTEST}",
    }


def detach_ablation(
    run_dir: Path, fractions: list[float], seeds: int, fit_root: Path, extra: list[str], full_cost: float
) -> dict[str, Any]:
    """EENet fitted with detach_scores true and false at each budget and scheduler seed: test
    accuracy and cost fraction per setting (budget x seed), and per budget the paired difference
    true - false in accuracy points over the seeds."""
    runs: dict[str, dict[str, list[list[float]]]] = {}
    for detach in (True, False):
        acc, cost = [], []
        for i, f in enumerate(fractions):
            acc.append([])
            cost.append([])
            for seed in range(seeds):
                m = fit(
                    run_dir,
                    "eenet",
                    f,
                    fit_root / f"eenet_detach_{str(detach).lower()}_{i}_s{seed}",
                    [*extra, override("policy.detach_scores", detach), override("policy.seed", seed)],
                )
                acc[-1].append(m["test"]["accuracy"])
                cost[-1].append(m["test"]["avg_cost"] / full_cost)
                print(
                    f"eenet detach_scores={str(detach).lower():5s} budget {f:.3f} seed {seed}: test acc "
                    f"{100 * acc[-1][-1]:.2f}% "
                    f"at cost {cost[-1][-1]:.3f}",
                    flush=True,
                )
        runs[str(detach).lower()] = {"test_accuracy": acc, "test_cost_fraction": cost}
    return {
        **runs,
        "detached_minus_not_points": detach_differences(runs["true"]["test_accuracy"], runs["false"]["test_accuracy"]),
    }


def detach_differences(detached: list[list[float]], not_detached: list[list[float]]) -> list[dict[str, Any]]:
    """Per budget, the paired difference detached - not detached of the test accuracies (budget x
    seed, fractions) in points over the seeds, with its t interval."""
    return [
        paired_difference([100 * a for a in t], [100 * a for a in f]).as_dict() for t, f in zip(detached, not_detached)
    ]


def detach_table(result: dict[str, Any]) -> str:
    """A Markdown table: per budget, the mean test accuracy (%) and cost of each setting and the
    paired difference with its interval."""
    lines = [
        "| budget | detached (authors) acc % (cost) | with gradient acc % (cost) | detached - with gradient, points "
        "[95 % CI] |",
        "|---:|---:|---:|---|",
    ]
    for i, f in enumerate(result["budget_fractions"]):
        cells = []
        for detach in ("true", "false"):
            a, c = result[detach]["test_accuracy"][i], result[detach]["test_cost_fraction"][i]
            cells.append(f"{100 * sum(a) / len(a):.2f} ({sum(c) / len(c):.3f})")
        d = result["detached_minus_not_points"][i]
        ci = "" if d["ci_low"] is None else f" [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
        lines.append(f"| {f:.3f} | {cells[0]} | {cells[1]} | {d['mean']:+.2f}{ci} |")
    return "\n".join(lines)


def table(result: dict[str, Any]) -> str:
    """A Markdown table: test accuracy (%) and realised test cost (fraction of full) per budget."""
    fr = result["budget_fractions"]
    head = "| policy | " + " | ".join(f"{f:.3f}" for f in fr) + " |"
    lines = [head, "|---|" + "---:|" * len(fr)]
    for p in result["policies"]:
        cells = [
            f"{100 * a:.2f} ({c:.3f})" for a, c in zip(result["test_accuracy"][p], result["test_cost_fraction"][p])
        ]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    static = ", ".join(
        f"{n} {100 * a:.2f}% at {c:.3f}"
        for n, a, c in zip(result["exit_names"], result["static_test_accuracy"], result["exit_cost_fractions"])
    )
    lines.append(f"\nstatic exits (test accuracy at cost): {static}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument(
        "--data", default=None, help="a conf/data preset (default: cifar10_small if present, else digits)"
    )
    parser.add_argument("--run-dir", type=Path, default=None, help="an existing stage-1 run dir: skip training")
    parser.add_argument("--train-overrides", nargs="*", default=[], help="extra eenn-train overrides")
    parser.add_argument("--fit-overrides", nargs="*", default=[], help="extra eenn-fit overrides for every policy")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (training and fitting)")
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_policy_quality")
    parser.add_argument(
        "--eenet-detach",
        action="store_true",
        help="compare EENet's policy.detach_scores=true and false instead of the policies",
    )
    parser.add_argument("--seeds", type=int, default=3, help="scheduler seeds per setting (--eenet-detach)")
    add_output_args(parser)
    args = parser.parse_args()
    out = output_path(args, OUT_DETACH if args.eenet_detach else OUT)
    if args.quick:  # digits, 4 batches of one epoch, fits in the JSON's folder
        args.data, args.epochs, args.workdir = "digits", 1, out.parent
        args.train_overrides = [*args.train_overrides, "trainer.limit_train_batches=4"]
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()

    if args.run_dir is None:
        data = args.data or ("cifar10_small" if CIFAR10_SMALL.is_file() else "digits")
        run_dir = args.workdir / "train"
        stage1 = train_stage1(data, args.backbone, args.epochs, run_dir, args.train_overrides)
    else:
        run_dir = args.run_dir
        stage1 = TrainRun(run_dir).metrics()
    run_dir = run_dir.resolve()
    val, test = TrainRun(run_dir).predictions("val"), TrainRun(run_dir).predictions("test")
    costs = val.costs_in("flops")
    first = float(costs[0] / costs[-1])
    fractions = [first + (1 - first) * i / 6 for i in range(1, 6)]  # strictly between the first and last exit

    if args.eenet_detach:
        seeds = 1 if args.quick else args.seeds
        ablation = detach_ablation(
            run_dir, fractions, seeds, args.workdir / "fit", args.fit_overrides, float(costs[-1])
        )
        result = {
            "benchmark": "eenet_detach",
            "command": " ".join([".venv/bin/python", "benchmarks/policy_quality.py", *sys.argv[1:]]),
            "stage1_run_dir": str(run_dir),
            "dataset": stage1.get("data"),
            "backbone": stage1.get("backbone"),
            "epochs": stage1.get("epochs"),
            "val_size": int(val.labels.numel()),
            "test_size": int(test.labels.numel()),
            "exit_cost_fractions": (costs / costs[-1]).tolist(),
            "budget_fractions": fractions,
            "seeds": seeds,
            "fit_overrides": args.fit_overrides,
            **ablation,
            "total_seconds": time.perf_counter() - t0,
            "code": code_version(),
        }
        write_result(out, result)
        print(detach_table(result), f"\n-> {out}")
        return

    acc: dict[str, list[float]] = {p: [] for p in POLICIES}
    cost: dict[str, list[float]] = {p: [] for p in POLICIES}
    details: dict[str, list[dict[str, Any]]] = {p: [] for p in POLICIES}
    fit_root = args.workdir / "fit"
    for p in POLICIES:
        for i, f in enumerate(fractions):
            m = fit(run_dir, p, f, fit_root / f"{p}_{i}", args.fit_overrides)
            acc[p].append(m["test"]["accuracy"])
            cost[p].append(m["test"]["avg_cost"] / float(costs[-1]))
            details[p].append(
                {
                    "budget_fraction": m["budget_fraction"],
                    "val_accuracy": m["val"]["accuracy"],
                    "val_cost_fraction": m["val"]["avg_cost"] / float(costs[-1]),
                    "val_exit_fractions": m["val"]["exit_fractions"],
                    "test_exit_fractions": m["test"]["exit_fractions"],
                    "fit_seconds": m["fit_seconds"],
                    "warnings": m["warnings"],
                    "fitted": m["fitted"],
                }
            )
            print(
                f"{p:14s} budget {f:.3f}: test acc {100 * acc[p][-1]:.2f}% at cost {cost[p][-1]:.3f} "
                f"(val {100 * m['val']['accuracy']:.2f}% at {details[p][-1]['val_cost_fraction']:.3f})",
                flush=True,
            )

    result: dict[str, Any] = {
        "benchmark": "policy_quality",
        "command": " ".join([".venv/bin/python", "benchmarks/policy_quality.py", *sys.argv[1:]]),
        "dataset": stage1.get("data"),
        "backbone": stage1.get("backbone"),
        "epochs": stage1.get("epochs"),  # the epochs stage 1 trained (Lightning's count when it stopped)
        "stage1_run_dir": str(run_dir),
        "stage1_overrides": stage1.get("overrides"),
        "train_seconds": stage1.get("train_seconds"),
        "val_size": int(val.labels.numel()),
        "test_size": int(test.labels.numel()),
        "exit_names": val.exit_names,
        "exit_cost_fractions": (costs / costs[-1]).tolist(),
        "static_val_accuracy": val.accuracy_per_exit().tolist(),
        "static_test_accuracy": test.accuracy_per_exit().tolist(),
        "cost_unit": "flops",
        "budget_fractions": fractions,
        "policies": list(POLICIES),
        "fit_overrides": args.fit_overrides,
        "test_accuracy": acc,
        "test_cost_fraction": cost,
        "details": details,
        "acceptance": acceptance(acc),
        "total_seconds": time.perf_counter() - t0,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg()[0],
        },
    }
    write_result(out, result)
    print(table(result))
    a = result["acceptance"]
    print(
        f"eenet - maxprob (points): {[round(d, 2) for d in a['eenet_minus_maxprob_points']]}; "
        f"acceptance {'holds' if a['holds'] else 'does NOT hold'} -> {out}"
    )


if __name__ == "__main__":
    main()
