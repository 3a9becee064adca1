"""Oracles: the ceilings on every accuracy-cost curve. They read the labels, so they run offline
only: their per-sample target exit is computed from the labels (and all exits' logits) into the
state that :func:`eenn.policies.simulate.simulate` starts from; ``init_state`` (what an engine
calls) refuses with an EENNError.

The decision itself is ordinary: at exit 0 a sample whose target is later jumps straight to it,
skipping the heads in between, and exits there. So a sample sent to exit k pays
``a_k = costs[k] - head_costs[1..k-1]``, the least any route to exit k costs. a_k need not rise
with k: a costly head at exit j makes jumping past it to a later exit cheaper than stopping at j.

- ``oracle``: each sample exits at its cheapest correct exit (argmin a_k over the exits that are
  right; the earliest among equal costs), or the last exit if none is correct.
- ``oracle_budget``: the best accuracy any assignment reaches at an average cost <= the budget, on
  the data it is evaluated on. A sample that is not made correct goes to the cheapest exit f
  (argmin a_k, exit 0 for any real network); making sample n correct costs
  w_n = a(its cheapest correct exit) - a_f more, and no assignment makes it correct for less. With
  every sample worth one correct answer, taking the samples in increasing w_n while the budget
  lasts is exact (an exchange argument: no other set of the same total weight holds more
  samples), so no gap.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from eenn.errors import EENNError
from eenn.policies.base import Decision, ExitPolicy, State, register
from eenn.policies.budget import check_realised_budget
from eenn.predictions import Predictions


def jump_costs(costs: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """a_k (K,) float64: what a sample pays that evaluates exit 0's head and jumps straight to exit k."""
    skipped = torch.cat([torch.zeros(2, dtype=torch.float64), torch.cumsum(heads[1:-1].double(), 0)])[: len(costs)]
    return costs.double() - skipped


@register("oracle")
class OraclePolicy(ExitPolicy):
    online: ClassVar[bool] = False
    budgeted: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.costs: torch.Tensor | None = None  # (K,) a_k: a sample's cost when it jumps to exit k

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
        cost, best = torch.where(correct, self.costs, torch.inf).min(1)  # the cheapest correct exit
        if not self.budgeted:
            return {"target": torch.where(has, best, torch.full_like(best, logits.shape[1] - 1))}
        floor = int(self.costs.argmin())
        weight = cost - self.costs[floor]  # inf where no exit is right
        order = torch.argsort(weight, stable=True)
        take = torch.zeros_like(has)
        take[order] = weight[order].cumsum(0) <= logits.shape[0] * (self.budget - float(self.costs[floor]))
        return {"target": torch.where(take, best, torch.full_like(best, floor))}

    def _decide(self, k: int, logits_k: torch.Tensor, state: State) -> Decision:
        target = state["target"]
        return Decision(target == k, target.clone(), state)

    def _fit(self, val: Predictions, costs: torch.Tensor, heads: torch.Tensor, budget: float | None) -> None:
        self.costs = jump_costs(costs, heads)
        if self.budgeted:
            if budget is None:
                raise EENNError("policy 'oracle_budget' needs a budget.")
            if budget < float(self.costs.min()):
                raise EENNError(f"budget {budget:g} is below the cheapest exit's cost {float(self.costs.min()):g}.")
        check_realised_budget(self, val, costs, heads, budget if self.budgeted else None)

    def _cheapest(self, val: Predictions, costs: torch.Tensor, heads: torch.Tensor) -> float:
        return float(jump_costs(costs, heads).min())

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
