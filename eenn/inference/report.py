"""Cost accounting in the form of the Distiller early-exit article's Figure 4 table.

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

from collections.abc import Sequence
from typing import Any

import torch

from eenn.cost import CostProfile
from eenn.errors import EENNError
from eenn.policies.simulate import realised_cost

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
        per_exit.append({
            "name": e.name,
            "overhead": 0.0 if last else float(head[k]),  # the last head is the backbone's own classifier
            "through": float(through[k]),
            "fraction": int(counts[k]) / n,
            "avg_cost": float(mine.mean()) if mine.numel() else None,  # what its samples paid
            "contribution": float(mine.sum()) / n,  # fraction x avg_cost: the sum is the average cost
            "savings_after": 0.0 if last else standard - float(stages_upto[k]),
        })
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
    return "\n".join(
        "  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))]) for r in rows
    )
