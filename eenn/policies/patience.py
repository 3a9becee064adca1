"""PABEE's patience policy: exit once the prediction has stayed the same for ``patience``
consecutive exits.

As in PABEE, a counter per sample counts how many exits in a row repeated the previous exit's
prediction (0 at exit 0, reset to 0 on a change); the sample exits when it reaches ``patience``.
So patience 0 exits everyone at exit 0, patience 1 exits at the first exit that agrees with the
one before it, and patience >= K-1 sends everyone to the last exit.

For a budget, every patience 0..K-1 is simulated on validation and the one with the best
accuracy among those within the budget is kept (the smallest on ties).
"""

from __future__ import annotations

from typing import Any

import torch

from eenn.errors import EENNError, is_number
from eenn.policies.base import Decision, ExitPolicy, State, continue_to_next, register
from eenn.policies.budget import check_realised_budget, within_budget
from eenn.policies.simulate import realised_cost, simulate
from eenn.predictions import Predictions


@register("patience")
class PatiencePolicy(ExitPolicy):
    def __init__(self, patience: int | None = None) -> None:
        super().__init__()
        if patience is not None and (not is_number(patience, integer=True) or patience < 0):
            raise EENNError(
                f"policy.patience must be a non-negative integer or null (fit to the budget), got {patience!r}."
            )
        self.patience = patience
        self.fitted_patience: int | None = patience

    def init_state(self, n: int) -> State:
        return {
            "prev": torch.full((n,), -1, dtype=torch.int64, device=self.device),
            "count": torch.zeros(n, dtype=torch.int64, device=self.device),
        }

    def _decide(self, k: int, logits_k: torch.Tensor, state: State) -> Decision:
        pred = logits_k.argmax(-1)
        count = torch.where(pred == state["prev"], state["count"] + 1, torch.zeros_like(state["count"]))
        return continue_to_next(k, count >= self.fitted_patience, {"prev": pred, "count": count})

    def _fit(self, val: Predictions, costs: torch.Tensor, heads: torch.Tensor, budget: float | None) -> None:
        if self.patience is None:
            if budget is None:
                raise EENNError("policy 'patience' needs a budget or policy.patience.")
            best: tuple[float, int] | None = None
            for p in range(val.num_exits):
                self.fitted_patience = p
                exit_idx, evaluated = simulate(self, val.logits, val.labels)
                if not within_budget(float(realised_cost(exit_idx, evaluated, costs, heads).mean()), budget):
                    break  # a larger patience only exits later
                pred = val.logits[torch.arange(val.num_samples), exit_idx].argmax(-1)
                acc = float((pred == val.labels).double().mean())
                if best is None or acc > best[0]:
                    best = (acc, p)
            if best is None:
                raise EENNError(
                    f"budget {budget:g} is below the cheapest patience schedule (patience 0: everyone at exit 0)."
                )
            self.fitted_patience = best[1]
        self.info["patience"] = self.fitted_patience
        check_realised_budget(self, val, costs, heads, budget if self.patience is None else None)

    def hparams(self) -> dict[str, Any]:
        return {"patience": self.patience}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"patience": torch.tensor([self.fitted_patience])}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.fitted_patience = int(tensors["patience"][0])

    def check_fitted(self) -> None:
        if self.fitted_patience < 0:
            raise ValueError(f"its patience is {self.fitted_patience}, expected >= 0")
