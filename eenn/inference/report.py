"""What an inference run reports: cost accounting in the form of the Distiller early-exit article's
Figure 4 table, the engine's exits next to offline simulation's, and timing.

Per exit: the exit head's overhead, the cost through that exit (the backbone up to it plus every
head up to it), the % of samples exiting there and the savings of the layers after it. Totals:
% exiting early, average cost per input (the mean of the per-sample realised costs, so samples
that skipped heads, like DEEx's offloaded ones, pay less than "through" says), savings per
input, speedup over the standard backbone and the worst case with every head's overhead.

The same function serves the expected numbers (a policy's exits from offline simulation on
saved predictions) and the realised ones (the exits an engine run took); :func:`format_report`
prints them side by side.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from eenn.cost import CostProfile
from eenn.errors import EENNError
from eenn.inference.engine import ExitResult
from eenn.policies.base import ExitPolicy
from eenn.policies.simulate import realised_cost, simulate
from eenn.predictions import Predictions

UNITS = ("macs", "flops", "latency_ms")


def cost_report(
    profile: CostProfile, exit_index: torch.Tensor, heads_evaluated: torch.Tensor, unit: str = "macs"
) -> dict[str, Any]:
    """The Figure 4 numbers for one assignment of samples to exits, costs in ``unit``."""
    if unit not in UNITS:
        raise EENNError(f"report unit must be one of {UNITS}, got {unit!r}.")
    if profile.backbone.get(unit) is None:
        raise EENNError(f"the cost profile has no {unit!r} (latency is measured only when cost.latency=true).")
    K, n = len(profile.exits), exit_index.numel()
    through = torch.tensor(profile.per_exit(unit), dtype=torch.float64)
    head = torch.tensor(profile.per_head(unit), dtype=torch.float64)
    standard = float(profile.backbone[unit])
    cost = realised_cost(exit_index, heads_evaluated, through, head)
    stages_upto = through - torch.cumsum(head, 0)  # the backbone alone up to exit k
    counts = torch.bincount(exit_index, minlength=K)
    per_exit = []
    for k, e in enumerate(profile.exits):
        last = k == K - 1
        mine = cost[exit_index == k]
        per_exit.append(
            {
                "name": e.name,
                "overhead": 0.0 if last else float(head[k]),  # the last head is the backbone's own classifier
                "through": float(through[k]),
                "fraction": int(counts[k]) / n,
                "avg_cost": float(mine.mean()) if mine.numel() else None,  # what its samples paid
                "contribution": float(mine.sum()) / n,  # fraction x avg_cost: the sum is the average cost
                "savings_after": 0.0 if last else standard - float(stages_upto[k]),
            }
        )
    average = float(cost.mean())
    return {
        "unit": unit,
        "num_samples": n,
        "exits": per_exit,
        "overhead_total": float(head[:-1].sum()),
        "standard": standard,
        "worst_case": float(through[-1]),
        "total_exit_early": 1.0 - int(counts[-1]) / n,
        "average": average,
        "savings_per_input": 1.0 - average / standard,
        "speedup": standard / average,
    }


def _fmt(value: Any, kind: str, unit: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "x":
        return f"{value:.3f}"
    return f"{value:,.0f}" if unit != "latency_ms" else f"{value:.4f}"


def report_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows in the article's order."""
    u = report["unit"]
    name = {"macs": "MACs", "flops": "FLOPs", "latency_ms": "ms"}[u]
    rows = [(f"Overhead est. in {name} (all exit heads)", _fmt(report["overhead_total"], "c", u))]
    for e in report["exits"][:-1]:
        rows += [
            (f"  {e['name']}: overhead of its head", _fmt(e["overhead"], "c", u)),
            (f"  {e['name']}: num {name} through it", _fmt(e["through"], "c", u)),
            (f"  {e['name']}: savings of the layers after it", _fmt(e["savings_after"], "c", u)),
            (f"  % exit {e['name']}", _fmt(e["fraction"], "pct", u)),
        ]
    last = report["exits"][-1]
    rows += [
        (f"% not exiting early ({last['name']})", _fmt(last["fraction"], "pct", u)),
        (f"Total {name} standard backbone", _fmt(report["standard"], "c", u)),
        ("Worst case with overhead", _fmt(report["worst_case"], "c", u)),
        ("Total % exit early", _fmt(report["total_exit_early"], "pct", u)),
        (f"Average {name}/input", _fmt(report["average"], "c", u)),
        ("Savings per data input", _fmt(report["savings_per_input"], "pct", u)),
        ("Speedup", _fmt(report["speedup"], "x", u)),
    ]
    return rows


def format_report(columns: dict[str, dict[str, Any]], extra: Sequence[tuple[str, Sequence[str]]] = ()) -> str:
    """Reports (same network, same unit) side by side, e.g. {"expected": ..., "realised": ...};
    ``extra``: further (label, one value per column) rows."""
    tables = [report_rows(r) for r in columns.values()]
    labels = [label for label, _ in tables[0]]
    rows = [("", *columns)] + [(label, *(t[i][1] for t in tables)) for i, label in enumerate(labels)]
    rows += [(label, *values) for label, values in extra]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))]) for r in rows)


def latency_stats(t: torch.Tensor) -> dict[str, float]:
    """Mean, median, 95th percentile and maximum of per-sample times."""
    return {
        "mean": float(t.mean()),
        "p50": float(t.quantile(0.5)),
        "p95": float(t.quantile(0.95)),
        "max": float(t.max()),
    }


def expected_vs_realised(
    policy: ExitPolicy, preds: Predictions, result: ExitResult, profile: CostProfile, unit: str
) -> dict[str, Any]:
    """The engine's run next to what offline simulation of ``policy`` on the saved predictions
    of the same samples expects: accuracy, agreement (same exit, same answer), exit fractions and
    the cost reports in ``unit``."""
    expected_idx, expected_heads = simulate(policy, preds.logits, preds.labels)
    expected_pred = preds.logits[torch.arange(preds.num_samples), expected_idx].argmax(-1)
    reports = {
        "expected": cost_report(profile, expected_idx, expected_heads, unit),
        "realised": cost_report(profile, result.exit_index, result.heads_evaluated, unit),
    }
    return {
        "accuracy": {"expected": float((expected_pred == preds.labels).double().mean()), "realised": result.accuracy()},
        "agreement": {
            "exit_index": float((expected_idx == result.exit_index).double().mean()),
            "predictions": float((expected_pred == result.predictions).double().mean()),
        },
        "exit_fractions": {k: [e["fraction"] for e in r["exits"]] for k, r in reports.items()},
        "cost_report": reports,
    }


def timing_summary(results: Sequence[ExitResult], backbone_s: Sequence[float] | None) -> dict[str, Any]:
    """Wall time, per-sample latency, policy time and the batches each stage ran, over repeated
    passes of the engine (and of the plain backbone, on the same inputs): the medians, with the
    measured speedup and the policy's overhead from them, and every pass's time for the spread.
    Per-sample latency and batches come from the engine pass of median wall time."""
    walls = [r.wall_s for r in results]
    mid = sorted(results, key=lambda r: r.wall_s)[len(results) // 2]
    engine_s = statistics.median(walls)
    n = mid.num_samples
    out: dict[str, Any] = {
        "repeats": len(results),
        "engine_s": engine_s,
        "engine_s_passes": walls,
        "ms_per_sample": 1e3 * engine_s / n,
        "latency_ms": latency_stats(mid.latency_ms),
        "policy_s": statistics.median(r.policy_s for r in results),
        "stage_batches": [
            {"count": len(b), "mean_size": (sum(b) / len(b)) if b else None} for b in mid.stage_batch_sizes
        ],
        "backbone_s": None,
        "backbone_s_passes": None,
        "realised_speedup": None,
        "policy_overhead_pct": None,
    }
    if backbone_s:
        out["backbone_s"] = statistics.median(backbone_s)
        out["backbone_s_passes"] = list(backbone_s)
        out["realised_speedup"] = out["backbone_s"] / engine_s
        out["policy_overhead_pct"] = 100 * out["policy_s"] / out["backbone_s"]
    return out
