"""Stage-2 speed: fit time of every policy at a few budgets, and offline evaluation time.

Synthetic but realistic predictions (exits of increasing accuracy whose confidence tracks
correctness): 5,000 validation samples x 3 exits x 10 classes, 10,000 test samples. Reports the
median of repeats and writes ``benchmarks/results/fit_speed.json``. Targets: EENet fits in < 60 s,
every other policy in < 1 s per budget, offline evaluation of 10k samples in < 1 s.

    .venv/bin/python benchmarks/fit_speed.py [--repeats 5] [--eenet-repeats 3] [--threads N]
    .venv/bin/python benchmarks/fit_speed.py --quick      # small sets, one repeat: a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from common import add_output_args, output_path, write_result

from eenn.evaluation.offline import evaluate
from eenn.policies import POLICIES, ExitPolicy, build_policy, policy_class
from eenn.policies.synthetic import synthetic_predictions
from eenn.predictions import Predictions

OUT = Path(__file__).resolve().parent / "results" / "fit_speed.json"
FRACTIONS = [0.5, 0.7, 0.9]
LIMITS = {"eenet_fit_s": 60.0, "heuristic_fit_s": 1.0, "offline_eval_10k_s": 1.0}


def fit_once(name: str, val: Predictions, budget: float | None) -> ExitPolicy:
    return build_policy(name).fit(val, budget, "flops")


def timed(fn: Any, repeats: int) -> tuple[float, list[float], Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eenet-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_output_args(parser)
    args = parser.parse_args()
    out = output_path(args, OUT)
    sizes = (400, 800) if args.quick else (5000, 10_000)
    if args.quick:
        args.repeats, args.eenet_repeats = 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]  # other jobs on the machine distort timings: recorded
    val = synthetic_predictions(sizes[0], num_exits=3, num_classes=10, seed=0)
    test = synthetic_predictions(sizes[1], num_exits=3, num_classes=10, seed=1, split="test")
    full = float(val.costs[-1])
    build_policy("eenet", max_epochs=2).fit(val, 0.7 * full, "flops")  # import Lightning outside the timings

    rows = []
    for name in POLICIES.names():
        for fraction in FRACTIONS if policy_class(name).budgeted else [None]:
            probe = build_policy(name)
            budget = None if fraction is None else max(fraction * full, probe.cheapest_cost(val, "flops"))
            repeats = args.eenet_repeats if name == "eenet" else args.repeats
            fit_s, fit_all, policy = timed(partial(fit_once, name, val, budget), repeats)
            eval_s, _, S = timed(partial(evaluate, policy, test, "flops"), args.repeats)
            Sv = evaluate(policy, val, "flops")
            rows.append(
                {
                    "policy": name,
                    "budget_fraction": None if budget is None else budget / full,
                    "fit_s_median": fit_s,
                    "fit_s_all": fit_all,
                    "eval_test_10k_s_median": eval_s,
                    "val_accuracy": Sv["accuracy"],
                    "val_cost_fraction": Sv["avg_cost_fraction"],
                    "test_accuracy": S["accuracy"],
                    "test_cost_fraction": S["avg_cost_fraction"],
                    **({"epochs": policy.info["epochs"]} if name == "eenet" else {}),
                }
            )
            r = rows[-1]
            print(
                f"{name:14s} budget {r['budget_fraction'] if budget else '-':>6.4} fit {fit_s:7.3f}s "
                f"eval(10k) {eval_s:6.3f}s  val acc {r['val_accuracy']:.4f} cost {r['val_cost_fraction']:.4f}  "
                f"test acc {r['test_accuracy']:.4f} cost {r['test_cost_fraction']:.4f}"
            )

    eenet_max = max(r["fit_s_median"] for r in rows if r["policy"] == "eenet")
    heuristic_max = max(r["fit_s_median"] for r in rows if r["policy"] != "eenet")
    eval_max = max(r["eval_test_10k_s_median"] for r in rows)
    summary = {"eenet_fit_s_max": eenet_max, "heuristic_fit_s_max": heuristic_max, "offline_eval_10k_s_max": eval_max}
    passed = (
        eenet_max < LIMITS["eenet_fit_s"]
        and heuristic_max < LIMITS["heuristic_fit_s"]
        and eval_max < LIMITS["offline_eval_10k_s"]
    )
    write_result(
        out,
        {
            "benchmark": "fit_speed",
            "machine": {
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
            },
            "data": {"val": list(val.logits.shape), "test": list(test.logits.shape), "synthetic": True},
            "repeats": {"heuristics": args.repeats, "eenet": args.eenet_repeats},
            "limits": LIMITS,
            "summary": summary,
            "pass": passed,
            "results": rows,
        },
    )
    print(f"{summary} pass={passed} -> {out}")


if __name__ == "__main__":
    main()
