"""Risk control (issue 17's acceptance): does policy=risk (Learn then Test) keep the loss against
the final exit within epsilon on data it was not calibrated on, as often as it promises, and what
compute does it save? Beside it, the uncertified baseline: the same max-probability rule fitted to
the same empirical risk on the calibration split (policy=risk with certify=false), no test.

On the saved predictions of a stage-1 run (val and test pooled), ``--splits`` random re-splits into
a calibration half and a test half. Each split, for each epsilon, delta and loss (drop,
disagreement): both rules are fitted on the calibration half, as ``eenn-fit policy=risk`` fits
them, and scored on the test half. Every candidate's per-sample losses and costs are computed once
on the pool, so a split is a pair of matrix products over its masks: 1,000 re-splits take seconds.
Split 0 is also fitted by the policy itself, which must choose the same threshold.

The guarantee is about the true risk; the test half only estimates it, so a violation is a test
risk above epsilon + 2 sqrt(epsilon (1 - epsilon) / n_test). The raw rate of test risk > epsilon is
reported too. The promise holds when the violation rate is <= delta + 2 standard errors of a rate
from ``--splits`` draws. No temperature scaling (max probabilities as the network gives them).

Writes ``benchmarks/results/risk_control.json``.

    .venv/bin/python benchmarks/risk_control.py --run-dir <stage-1 run dir> [--splits 1000]
    .venv/bin/python benchmarks/risk_control.py --quick   (synthetic predictions, 50 splits)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import add_output_args, output_path  # noqa: E402

from eenn.policies import build_policy  # noqa: E402
from eenn.policies.risk import LOSSES, binomial_pvalues, candidate_exits, candidate_grid, exit_losses, fixed_sequence  # noqa: E402
from eenn.policies.synthetic import synthetic_predictions  # noqa: E402
from eenn.predictions import Predictions  # noqa: E402
from eenn.rundir import Stage1Run  # noqa: E402
from eenn.utils.io import write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "risk_control.json"
EPSILONS = (0.005, 0.01, 0.02, 0.05)
DELTA = 0.1
CANDIDATES = 100


def pool(run_dir: Path | None) -> tuple[Predictions, str]:
    """Val and test predictions of the run pooled into one set (synthetic ones without a run)."""
    if run_dir is None:
        parts = [synthetic_predictions(1500, seed=0), synthetic_predictions(1500, seed=1, split="test")]
        source = "synthetic (eenn.policies.synthetic)"
    else:
        run = Stage1Run(run_dir)
        parts = [run.predictions("val"), run.predictions("test")]
        source = str(Path(run_dir).resolve())
    a, b = parts
    return Predictions(logits=torch.cat([a.logits, b.logits]), labels=torch.cat([a.labels, b.labels]), costs=a.costs,
                       cost_unit=a.cost_unit, exit_names=a.exit_names), source


def chosen(passed: torch.Tensor, cal_cost: torch.Tensor) -> torch.Tensor:
    """Per split, the cheapest passing candidate (first on ties, as the policy), -1 where none passes."""
    j = torch.where(passed, cal_cost, torch.full_like(cal_cost, math.inf)).argmin(1)
    return torch.where(passed.any(1), j, torch.full_like(j, -1))


def outcome(j: torch.Tensor, test_loss: torch.Tensor, test_cost: torch.Tensor, n_test: int, epsilon: float,
            delta: float) -> dict[str, Any]:
    """Test risk and cost of each split's choice (-1: everyone at the final exit: no loss, full cost)."""
    s = torch.arange(len(j))
    risk = torch.where(j >= 0, test_loss[s, j.clamp_min(0)] / n_test, torch.zeros(len(j), dtype=torch.float64))
    cost = torch.where(j >= 0, test_cost[s, j.clamp_min(0)], torch.ones(len(j), dtype=torch.float64))
    margin = 2 * math.sqrt(epsilon * (1 - epsilon) / n_test)
    splits = len(j)
    violation = float((risk > epsilon + margin).double().mean())
    return {
        "violation_rate": violation,
        "raw_rate_test_risk_above_epsilon": float((risk > epsilon).double().mean()),
        "violation_margin": margin,
        "allowed": delta + 2 * math.sqrt(delta * (1 - delta) / splits),
        "holds": violation <= delta + 2 * math.sqrt(delta * (1 - delta) / splits),
        "mean_test_risk": float(risk.mean()),
        "mean_cost_saved": float(1 - cost.mean()),
        "refused_rate": float((j < 0).double().mean()),
    }


def run(preds: Predictions, splits: int, epsilons: tuple[float, ...], delta: float, seed: int) -> dict[str, Any]:
    n = preds.num_samples
    n_cal = n // 2
    n_test = n - n_cal
    grid = candidate_grid(CANDIDATES)
    scores = build_policy("maxprob").score_matrix(preds.logits)  # the score policy=risk decides on
    exits = candidate_exits(scores, grid)  # (N, M)
    cost = (preds.costs / preds.costs[-1])[exits]  # (N, M), fraction of the full cost
    gen = torch.Generator().manual_seed(seed)
    cal = torch.zeros(splits, n, dtype=torch.float64)
    for s in range(splits):
        cal[s, torch.randperm(n, generator=gen)[:n_cal]] = 1.0
    test = 1.0 - cal
    cal_cost, test_cost = cal @ cost / n_cal, test @ cost / n_test
    out: dict[str, Any] = {}
    for loss in LOSSES:
        L = exit_losses(preds.logits, preds.labels, loss).gather(1, exits).double()  # (N, M)
        cal_loss, test_loss = cal @ L, test @ L  # (S, M) loss counts
        rows = []
        for eps in epsilons:
            certified = fixed_sequence(binomial_pvalues(cal_loss, n_cal, eps), delta)
            passed = torch.arange(CANDIDATES)[None, :] < certified[:, None]
            ltt = chosen(passed, cal_cost)
            baseline = chosen(cal_loss <= eps * n_cal, cal_cost)
            check_against_the_policy(preds, cal[0].bool(), loss, eps, delta, int(ltt[0]))
            rows.append({"epsilon": eps, "delta": delta,
                         "ltt": outcome(ltt, test_loss, test_cost, n_test, eps, delta),
                         "uncertified_maxprob": outcome(baseline, test_loss, test_cost, n_test, eps, delta)})
            r = rows[-1]
            print(f"{loss:>12} eps={eps:<6} LTT: violations {r['ltt']['violation_rate']:.3f} (raw "
                  f"{r['ltt']['raw_rate_test_risk_above_epsilon']:.3f}), saved {r['ltt']['mean_cost_saved']:.3f} | "
                  f"uncertified: violations {r['uncertified_maxprob']['violation_rate']:.3f} (raw "
                  f"{r['uncertified_maxprob']['raw_rate_test_risk_above_epsilon']:.3f}), saved "
                  f"{r['uncertified_maxprob']['mean_cost_saved']:.3f}", flush=True)
        out[loss] = rows
    return {"n_calibration": n_cal, "n_test": n_test, "results": out}


def check_against_the_policy(preds: Predictions, cal: torch.Tensor, loss: str, eps: float, delta: float, j: int) -> None:
    """Split 0 fitted by policy=risk itself: the vectorised choice must be the policy's."""
    sub = Predictions(logits=preds.logits[cal], labels=preds.labels[cal], costs=preds.costs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a refusal warns; here it is an outcome like any other
        policy = build_policy("risk", epsilon=eps, delta=delta, loss=loss, candidates=CANDIDATES).fit(sub, None, "flops")
    got = -1 if policy.info["candidate"] is None else policy.info["candidate"]
    if got != j:
        raise RuntimeError(f"{loss} eps={eps}: the benchmark chose candidate {j}, policy=risk chose {got}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=None, help="a finished stage-1 run (its val + test predictions)")
    parser.add_argument("--splits", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.run_dir is None and not args.quick:
        parser.error("--run-dir is required (or --quick for a smoke run on synthetic predictions)")
    torch.set_num_threads(1)
    splits = 50 if args.quick else args.splits
    preds, source = pool(args.run_dir)
    start = time.perf_counter()
    result = run(preds, splits, EPSILONS, DELTA, args.seed)
    seconds = time.perf_counter() - start
    out = {
        "source": source,
        "exit_names": preds.exit_names,
        "per_exit_accuracy": preds.accuracy_per_exit().tolist(),
        "cost_fractions": (preds.costs / preds.costs[-1]).tolist(),
        "splits": splits,
        "seed": args.seed,
        "candidates": CANDIDATES,
        "temperature_scaling": False,
        "violation": "test risk > epsilon + 2 sqrt(epsilon (1 - epsilon) / n_test)",
        **result,
        "seconds": seconds,
        "host": platform.node(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    path = output_path(args, OUT)
    write_json(path, out)
    print(f"{splits} splits in {seconds:.1f} s -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
