"""Synthetic multi-exit predictions for tests, benchmarks and examples: exits of increasing
accuracy whose confidence is correlated with correctness, like a trained early-exit network's."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from eenn.predictions import Predictions


def synthetic_predictions(
    n: int,
    num_exits: int = 3,
    num_classes: int = 10,
    seed: int = 0,
    strength: Sequence[float] | None = None,
    difficulty_shift: float = 0.0,
    costs: Sequence[float] | None = None,
    head_costs: Sequence[float] | None = None,
    split: str = "val",
) -> Predictions:
    """``n`` samples; exit k's logits are noise plus ``strength[k] - difficulty`` on the true class,
    with a per-sample difficulty (N(difficulty_shift, 1): a positive shift makes a harder set)
    and per-sample confusions shared across exits (so exits mostly agree). Costs default to
    evenly spaced FLOPs with a small head overhead, plus a ``latency_ms`` table."""
    g = torch.Generator().manual_seed(seed)
    K, C = num_exits, num_classes
    strength = list(strength) if strength is not None else [2.0 + 2.5 * k / max(1, K - 1) for k in range(K)]
    labels = torch.randint(0, C, (n,), generator=g)
    difficulty = torch.randn(n, generator=g) + difficulty_shift
    shared = torch.randn(n, C, generator=g)
    onehot = torch.nn.functional.one_hot(labels, C).float()
    logits = torch.stack(
        [
            0.8 * shared + 0.7 * torch.randn(n, C, generator=g) + (strength[k] - 1.2 * difficulty)[:, None] * onehot
            for k in range(K)
        ],
        1,
    )
    if costs is None:
        costs = [1e6 * (k + 1) / K for k in range(K)]
    if head_costs is None:
        head_costs = [0.02 * costs[-1]] * (K - 1) + [0.0]
    costs_t = torch.tensor(costs, dtype=torch.float64)
    return Predictions(
        logits=logits,
        labels=labels,
        costs=costs_t,
        cost_unit="flops",
        head_costs=torch.tensor(head_costs, dtype=torch.float64),
        cost_table={"latency_ms": costs_t / costs_t[-1] * 4.7},
        head_cost_table={"latency_ms": torch.tensor(head_costs, dtype=torch.float64) / costs_t[-1] * 4.7},
        split=split,
        source_run="synthetic",
    )
