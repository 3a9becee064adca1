"""Thresholds for a budget: exit fractions -> thresholds (MSDNet's rule, EENet Algorithm 1) and
the 1-D search over a tilt of the fractions that meets an average-cost budget exactly.

Given per-sample scores S (N, K) (higher = more confident) and exit fractions pi (K,), exits are
walked in order: at exit k the ``count_k`` highest-scoring samples that have not exited yet exit
there, and t_k is the score of the last (lowest) of them; the last exit takes everyone left. A
sample then exits at the first k with S[n, k] >= t_k (ties at t_k exit too, so the realised
fractions can exceed the intended ones: budgets are always checked on the realised assignment).

The fractions come from a base distribution b (uniform for MSDNet, EENet's learned p_k) tilted
geometrically, pi_k ∝ b_k q^k: q < 1 moves mass to early exits, q > 1 to late ones. ``log q`` is
found by bisection as the value whose realised validation cost is the largest not above the budget.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from eenn.errors import EENNError
from eenn.policies.simulate import realised_cost, simulate
from eenn.predictions import Predictions

if TYPE_CHECKING:
    from eenn.policies.base import ExitPolicy

# Realised costs are means of float64 sums: allow their rounding, nothing more.
RTOL = 1e-9


def sweep_fractions(costs: torch.Tensor, n: int) -> list[float]:
    """``n`` budget fractions evenly spaced from the first exit's cost to the full cost: the range
    where policies differ (below the first exit every policy is clamped to it)."""
    lo = float(costs[0] / costs[-1])
    return [lo + (1 - lo) * i / (n - 1) for i in range(n)]


def within_budget(cost: float, budget: float) -> bool:
    return cost <= budget * (1.0 + RTOL)


def assign(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Exit index per sample: the first k with scores[:, k] >= thresholds[k]; the last exit always."""
    passed = scores >= thresholds
    passed[:, -1] = True
    return passed.to(torch.float32).argmax(1)  # argmax returns the first maximal index


def tilted_fractions(base: torch.Tensor, log_q: float) -> torch.Tensor:
    """pi_k ∝ base_k q^k; log_q = -inf / +inf put everyone at the first / last exit."""
    K = base.numel()
    if math.isinf(log_q):
        pi = torch.zeros(K, dtype=torch.float64)
        pi[0 if log_q < 0 else K - 1] = 1.0
        return pi
    ks = torch.arange(K, dtype=torch.float64)
    return torch.softmax(base.double().clamp_min(1e-300).log() + ks * log_q, 0)


def exit_counts(pi: torch.Tensor, n: int, rounding: str) -> list[int]:
    """How many samples each early exit lets out: floor(N pi_k) (MSDNet) or round(N pi_k) (EENet)."""
    x = pi[:-1] * n
    x = torch.floor(x) if rounding == "floor" else torch.round(x)
    return [int(c) for c in x.tolist()]


def thresholds_for_counts(scores: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Walk the exits in order; at exit k the counts[k] highest-scoring remaining samples exit and
    t_k is the lowest of their scores (+inf where nobody exits; -inf at the last exit)."""
    n, K = scores.shape
    t = torch.full((K,), math.inf, dtype=scores.dtype)
    t[-1] = -math.inf
    remaining = torch.ones(n, dtype=torch.bool)
    for k in range(K - 1):
        left = scores[remaining, k]
        m = min(counts[k], left.numel())
        if m == 0:
            continue
        t[k] = torch.kthvalue(left, left.numel() - m + 1).values  # the m-th largest
        remaining &= scores[:, k] < t[k]
    return t


def fit_to_budget(
    scores: torch.Tensor,
    base: torch.Tensor,
    costs: torch.Tensor,
    budget: float,
    rounding: str = "floor",
    span: float = 30.0,
    iters: int = 60,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Thresholds whose realised cost mean(costs[exit]) on ``scores`` is the largest not above
    ``budget``, over the tilt family pi_k ∝ base_k q^k, log q in [-span, span] plus the two
    extremes (everyone at the first / the last exit). Returns thresholds and what was found."""

    def trial(log_q: float) -> tuple[float, torch.Tensor]:
        counts = exit_counts(tilted_fractions(base, log_q), scores.shape[0], rounding)
        t = thresholds_for_counts(scores, counts)
        return float(costs[assign(scores, t)].mean()), t

    cost, t = trial(math.inf)
    if within_budget(cost, budget):
        return t, {"log_q": None, "val_cost": cost, "note": "everyone at the last exit"}
    cost, t = trial(-math.inf)
    if not within_budget(cost, budget):
        raise EENNError(
            f"budget {budget:g} is below the cheapest possible average cost {cost:g} (everyone at the first exit)."
        )
    best = (cost, t, None)
    lo, hi = -span, span
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        cost, t = trial(mid)
        if within_budget(cost, budget):
            lo = mid
            if cost > best[0]:
                best = (cost, t, mid)
        else:
            hi = mid
    cost, t, log_q = best
    info: dict[str, Any] = {"log_q": log_q, "val_cost": cost}
    if log_q is None:
        info["note"] = "everyone at the first exit"
    return t, info


def realised_val_cost(policy: ExitPolicy, val: Predictions, costs: torch.Tensor, heads: torch.Tensor) -> float:
    """The policy's average cost on ``val`` as offline simulation realises it."""
    exit_idx, evaluated = simulate(policy, val.logits, val.labels)
    return float(realised_cost(exit_idx, evaluated, costs, heads).mean())


def check_realised_budget(
    policy: ExitPolicy, val: Predictions, costs: torch.Tensor, heads: torch.Tensor, fitted_to: float | None
) -> None:
    """Record the realised validation cost and, for a policy fitted to the budget ``fitted_to``,
    confirm on the actual simulation (ties, compaction and all) that it holds. Policies whose
    config fixes their decisions pass None: they do not spend a budget, they only report cost."""
    cost = realised_val_cost(policy, val, costs, heads)
    policy.info["val_cost"] = cost
    policy.info["fitted_to_budget"] = fitted_to is not None
    if fitted_to is not None and not within_budget(cost, fitted_to):
        raise RuntimeError(
            f"policy {policy.name!r}: simulated validation cost {cost:g} exceeds the budget {fitted_to:g} "
            "that it was fitted to (its scores are not batch-invariant)"
        )
