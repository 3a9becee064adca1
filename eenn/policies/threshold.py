"""Score-threshold policies: exit at the first exit k whose confidence score s_k >= t_k.

Thresholds come either from config (``thresholds``: one value per early exit, K-1 of them) or,
for a budget, from exit fractions by MSDNet's rule (see :mod:`eenn.policies.budget`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from eenn.errors import EENNError, is_number
from eenn.policies.base import Decision, ExitPolicy, State, continue_to_next
from eenn.policies.budget import check_realised_budget, fit_to_budget
from eenn.predictions import Predictions


class ThresholdPolicy(ExitPolicy):
    infinite_tensors: ClassVar[tuple[str, ...]] = ("thresholds",)
    #: MSDNet lets floor(N pi_k) samples out at exit k; EENet's Algorithm 1 rounds.
    rounding: ClassVar[str] = "floor"

    def __init__(self, thresholds: list[float] | None = None) -> None:
        super().__init__()
        if thresholds is not None:
            thresholds = list(thresholds)
            if not all(is_number(t) for t in thresholds):
                raise EENNError(f"policy.thresholds must be a list of finite numbers, got {thresholds!r}.")
        self.explicit = thresholds
        self.thresholds = None

    @property
    def thresholds(self) -> torch.Tensor | None:
        """(K,) float32, on the score scale."""
        return self._thresholds

    @thresholds.setter
    def thresholds(self, t: torch.Tensor | None) -> None:
        # 0-d views per exit, made where the tensor is set: indexing per decision is one more op, a
        # visible share at batch 1; views share its storage, so in-place edits show through
        self._thresholds, self._per_exit = t, (() if t is None else t.unbind())

    def score(self, k: int, logits_k: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Confidence score (B,) float32 at exit k (higher = more confident) and the new state."""
        raise NotImplementedError

    def config_threshold(self, t: float) -> float:
        """A threshold from config on the score scale (subclasses whose config unit differs convert)."""
        return t

    def score_matrix(self, logits: torch.Tensor) -> torch.Tensor:
        """Every sample's score at every exit, (N, K), computed as ``decide`` computes it."""
        state = self.init_state(logits.shape[0])
        cols = []
        for k in range(logits.shape[1]):
            s, state = self.score(k, logits[:, k].contiguous(), state)
            cols.append(s)
        return torch.stack(cols, 1)

    def base_fractions(self, val: Predictions, costs: torch.Tensor, budget: float) -> torch.Tensor:
        """The exit distribution the budget search tilts: uniform, so pi_k ∝ q^k as in MSDNet."""
        return torch.ones(val.num_exits, dtype=torch.float64)

    def _fit(self, val: Predictions, costs: torch.Tensor, heads: torch.Tensor, budget: float | None) -> None:
        K = val.num_exits
        if self.explicit is not None:
            if len(self.explicit) != K - 1:
                raise EENNError(
                    f"policy.thresholds needs {K - 1} values (one per early exit of the {K}), got {len(self.explicit)}."
                )
            t = [self.config_threshold(x) for x in self.explicit] + [-math.inf]
            self.thresholds = torch.tensor(t, dtype=torch.float32)
            check_realised_budget(self, val, costs, heads, None)
        else:
            if budget is None:
                raise EENNError(f"policy {self.name!r} needs a budget or policy.thresholds.")
            base = self.base_fractions(val, costs, budget)  # first: EENet trains its scores here
            scores = torch.cat([self.score_matrix(block) for _, block in val.row_blocks()])
            self.thresholds, info = fit_to_budget(scores, base, costs, budget, self.rounding)
            self.info.update(info)
            check_realised_budget(self, val, costs, heads, budget)

    def _decide(self, k: int, logits_k: torch.Tensor, state: State) -> Decision:
        s, state = self.score(k, logits_k, state)
        return continue_to_next(k, s >= self._per_exit[k], state)

    def hparams(self) -> dict[str, Any]:
        return {"thresholds": self.explicit}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"thresholds": self.thresholds}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.thresholds = tensors["thresholds"]

    def check_fitted(self) -> None:
        super().check_fitted()
        if tuple(self.thresholds.shape) != (self.num_exits,):
            raise ValueError(f"'thresholds' has shape {tuple(self.thresholds.shape)}, expected ({self.num_exits},)")
        # +inf at an early exit lets nobody out there; -inf would let everyone out, and the last
        # exit always takes who is left (fitting writes no other infinities)
        if bool((self.thresholds[:-1] == -math.inf).any()) or float(self.thresholds[-1]) != -math.inf:
            raise ValueError("its 'thresholds' must be finite or +inf at the early exits and -inf at the last")
