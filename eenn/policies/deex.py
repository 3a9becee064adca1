"""DEEx, decision early exit (Pacheco et al., sec. III): the first exit decides where a sample goes.

Exits 0..K-2 live on the edge, exit K-1 is the backbone in the cloud. At exit 0 (the DEEx) a
sample whose max probability is below ``p_d`` is offloaded straight to exit K-1, skipping heads
1..K-2 (it pays only the backbone and heads 0 and K-1). The others stay on the edge: exit 0 only
decides, and each following edge exit 1..K-3 answers when max p >= ``p_tar``; exit K-2, the
edge's last exit, always answers. With K = 2 the edge's last exit is exit 0 itself, so it answers
the samples it keeps.

``p_d`` from config, or (``p_d: null``) fitted to a budget with ``p_tar`` fixed: every candidate
p_d between consecutive distinct exit-0 scores is scored exactly (sorting plus a cumulative sum:
the exact form of a bisection over p_d), and the largest p_d (the most offloading) whose realised
validation cost is within the budget is kept.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from eenn.errors import EENNError, is_number
from eenn.policies.base import Decision, ExitPolicy, State, continue_to_next, register
from eenn.policies.budget import RTOL, check_realised_budget
from eenn.policies.features import max_prob
from eenn.policies.simulate import realised_cost, simulate
from eenn.predictions import Predictions


def _probability(value: Any, key: str, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if not is_number(value) or not 0.0 <= value <= 1.0:
        raise EENNError(f"{key} must be a probability in [0, 1]{' or null' if allow_none else ''}, got {value!r}.")
    return float(value)


@register("deex")
class DEExPolicy(ExitPolicy):
    has_p_d_curve: ClassVar[bool] = True
    jumps: ClassVar[bool] = True
    examples: ClassVar[tuple[dict[str, Any], ...]] = ({"p_tar": 0.8},)

    def __init__(self, p_d: float | None = None, p_tar: float = 0.9) -> None:
        super().__init__()
        self.p_d = _probability(p_d, "policy.p_d", allow_none=True)
        self.p_tar = _probability(p_tar, "policy.p_tar", allow_none=False)
        self.fitted_p_d: float | None = self.p_d

    def _decide(self, k: int, logits_k: torch.Tensor, state: State) -> Decision:
        K = self.num_exits
        p = max_prob(logits_k)
        if k == 0:
            offload = p < self.fitted_p_d
            stay = torch.full_like(offload, K == 2) & ~offload
            ones = torch.ones_like(p, dtype=torch.int64)
            return Decision(stay, torch.where(offload, ones * (K - 1), ones), state)
        return continue_to_next(k, p >= self.p_tar if k < K - 2 else torch.ones_like(p, dtype=torch.bool), state)

    def _fit(self, val: Predictions, costs: torch.Tensor, heads: torch.Tensor, budget: float | None) -> None:
        K = val.num_exits
        if K < 2:
            raise EENNError(
                f"policy 'deex' needs at least 2 exits (an edge exit and the backbone), the predictions have {K}."
            )
        if self.p_d is None:
            if budget is None:
                raise EENNError("policy 'deex' needs a budget or policy.p_d.")
            self.fitted_p_d = self._search_p_d(val, costs, heads, budget)
        self.info["p_d"] = self.fitted_p_d
        check_realised_budget(self, val, costs, heads, budget if self.p_d is None else None)

    def _schedules(
        self, val: Predictions, costs: torch.Tensor, heads: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every distinct p_d at once: the realised validation cost with the m lowest-scoring
        samples offloaded, m = 0..N, (N+1,), and the exit-0 scores sorted ascending (N,);
        p_d = sorted[m] offloads exactly those m, where sorted[m-1] < sorted[m]."""
        n, K = val.num_samples, val.num_exits
        fitted, self.fitted_p_d = self.fitted_p_d, 0.0  # nobody offloaded: each sample's edge cost
        exit_idx, evaluated = simulate(self, val.logits, val.labels)
        self.fitted_p_d = fitted
        edge = realised_cost(exit_idx, evaluated, costs, heads)
        offloaded = torch.zeros(1, K, dtype=torch.bool)
        offloaded[0, [0, K - 1]] = True
        cloud = float(realised_cost(torch.tensor([K - 1]), offloaded, costs, heads)[0])
        s = torch.cat([max_prob(block[:, 0].contiguous()) for _, block in val.row_blocks()])
        order = torch.argsort(s, stable=True)
        extra = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(cloud - edge[order], 0)])
        cost = (edge.sum() + extra) / n
        s_sorted = s[order]
        cost[1:n][s_sorted[:-1] == s_sorted[1:]] = math.inf  # p_d cannot split tied scores
        return cost, s_sorted

    def _cheapest(self, val: Predictions, costs: torch.Tensor, heads: torch.Tensor) -> float:
        if self.p_d is not None:
            return super()._cheapest(val, costs, heads)
        return float(self._schedules(val, costs, heads)[0].min())

    def _search_p_d(self, val: Predictions, costs: torch.Tensor, heads: torch.Tensor, budget: float) -> float:
        cost, s_sorted = self._schedules(val, costs, heads)
        ok = cost <= budget * (1.0 + RTOL)
        if not bool(ok.any()):
            raise EENNError(
                f"budget {budget:g} is below the cheapest DEEx schedule (cost {float(cost.min()):g} with "
                f"p_tar={self.p_tar}); raise the budget or lower policy.p_tar."
            )
        m = int(ok.nonzero().max())
        if m < len(s_sorted):
            return float(s_sorted[m])
        return float(np.nextafter(np.float32(s_sorted[-1]), np.float32(math.inf)))

    def hparams(self) -> dict[str, Any]:
        return {"p_d": self.p_d, "p_tar": self.p_tar}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"p_d": torch.tensor([self.fitted_p_d], dtype=torch.float64)}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.fitted_p_d = float(tensors["p_d"][0])

    def check_fitted(self) -> None:
        super().check_fitted()
        if not 0.0 <= self.fitted_p_d <= 1.0:
            raise ValueError(f"its p_d is {self.fitted_p_d:g}, expected a probability in [0, 1]")
