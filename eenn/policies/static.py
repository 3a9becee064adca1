"""Static policy: every sample answers at one fixed exit (the truncated network at exit k).

Samples walk exits 0..k, so the cost is ``costs[k]`` as the predictions file reports it and the
accuracy is exactly that exit's accuracy. Any budget is ignored (recorded only).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from eenn.errors import EENNError, is_number
from eenn.policies.base import Decision, ExitPolicy, State, continue_to_next, register
from eenn.policies.budget import check_realised_budget
from eenn.predictions import Predictions


@register("static")
class StaticPolicy(ExitPolicy):
    budgeted: ClassVar[bool] = False
    per_exit_only: ClassVar[bool] = True
    examples: ClassVar[tuple[dict[str, Any], ...]] = ({"exit": 1},)

    def __init__(self, exit: int = -1) -> None:
        super().__init__()
        if not is_number(exit, integer=True):
            raise EENNError(f"policy.exit must be an integer exit index, got {exit!r}.")
        self.exit = exit

    @property
    def target(self) -> int:
        return self.exit % self._require_fitted()

    def _fit(self, val: Predictions, costs: torch.Tensor, heads: torch.Tensor, budget: float | None) -> None:
        K = val.num_exits
        if not -K <= self.exit < K:
            raise EENNError(
                f"policy.exit={self.exit} is out of range for {K} exits (use 0..{K - 1} or -1 for the last)."
            )
        check_realised_budget(self, val, costs, heads, None)

    def _decide(self, k: int, logits_k: torch.Tensor, state: State) -> Decision:
        return continue_to_next(
            k, torch.full((logits_k.shape[0],), k >= self.target, dtype=torch.bool, device=logits_k.device), state
        )

    def hparams(self) -> dict[str, Any]:
        return {"exit": self.exit}
