"""Oracles: the ceilings on every accuracy-cost curve. They read the labels, so they run offline
only: their per-sample target exit is computed from the labels (and all exits' logits) into the
state that :func:`eenn.policies.simulate.simulate` starts from; ``init_state`` (what an engine
calls) refuses with an EENNError.

The decision itself is ordinary: at exit 0 a sample whose target is later jumps straight to it,
skipping the heads in between, and exits there. So a sample sent to exit k pays
``costs[k] - head_costs[1..k-1]``, less than any policy that looks at the heads on its way.

- ``oracle``: each sample exits at its earliest correct exit, or the last exit if none is correct.
- ``oracle_budget``: the best accuracy any assignment reaches at an average cost <= the budget, on
  the data it is evaluated on. Every sample starts at exit 0 (the cheapest); making sample n
  correct costs w_n = cost(its earliest correct exit) - cost(exit 0) more. With every sample worth
  one correct answer, taking the samples in increasing w_n while the budget lasts is exact (an
  exchange argument: no other set of the same total weight holds more samples), so no gap.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from eenn.errors import EENNError
from eenn.policies.base import Decision, ExitPolicy, State, register
from eenn.policies.budget import check_realised_budget
from eenn.predictions import Predictions


@register("oracle")
class OraclePolicy(ExitPolicy):
    online: ClassVar[bool] = False
    budgeted: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.costs: torch.Tensor | None = None  # (K,) a sample's cost when it jumps to exit k

    def init_state(self, n: int) -> State:
        raise EENNError(
            f"policy {self.name!r} needs the labels, so it runs only offline on saved predictions "
            "(eenn.evaluation.offline), not in the inference engine."
        )

    def offline_state(self, logits: torch.Tensor, labels: torch.Tensor | None) -> State:
        if labels is None:
            raise EENNError(f"policy {self.name!r} needs the labels to simulate; pass labels to simulate().")
        correct = logits.argmax(-1) == labels[:, None]
        has = correct.any(1)
        first = correct.to(torch.float32).argmax(1)
        if not self.budgeted:
            return {"target": torch.where(has, first, torch.full_like(first, logits.shape[1] - 1))}
        weight = torch.where(has, self.costs[first] - self.costs[0], torch.full_like(self.costs[first], torch.inf))
        order = torch.argsort(weight, stable=True)
        spent = torch.cumsum(weight[order], 0)
        take = torch.zeros_like(has)
        take[order] = spent <= logits.shape[0] * (self.budget - float(self.costs[0]))
        return {"target": torch.where(take, first, torch.zeros_like(first))}

    def _decide(self, k: int, logits_k: torch.Tensor, state: State) -> Decision:
        target = state["target"]
        return Decision(target == k, target.clone(), state)

    def _fit(self, val: Predictions, costs: torch.Tensor, heads: torch.Tensor, budget: float | None) -> None:
        skipped = torch.cat([torch.zeros(2, dtype=torch.float64), torch.cumsum(heads[1:-1].double(), 0)])[: len(costs)]
        self.costs = costs.double() - skipped
        if self.budgeted:
            if budget is None:
                raise EENNError("policy 'oracle_budget' needs a budget.")
            if budget < float(self.costs[0]):
                raise EENNError(f"budget {budget:g} is below the cost of the first exit {float(self.costs[0]):g}.")
        check_realised_budget(self, val, costs, heads, budget if self.budgeted else None)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"costs": self.costs}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.costs = tensors["costs"]

    def check_fitted(self) -> None:
        super().check_fitted()
        if tuple(self.costs.shape) != (self.num_exits,):
            raise ValueError(f"'costs' has shape {tuple(self.costs.shape)}, expected ({self.num_exits},)")


@register("oracle_budget")
class OracleBudgetPolicy(OraclePolicy):
    budgeted: ClassVar[bool] = True
