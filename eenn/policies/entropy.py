"""BranchyNet's / Distiller's policy: exit when the prediction's entropy is low.

The score is on EENet's normalised scale, s = 1 - H / log C (eq. 3: higher = more confident), so
budget fitting treats it like every other score: exit when s >= t_k. ``criterion`` picks H:

- ``entropy``: the Shannon entropy of the softmax (BranchyNet),
- ``cross_entropy``: -log(max p), Distiller's "entropy" (the cross-entropy of the exit against its
  own prediction, which needs no label).

Config ``thresholds`` are given as Distiller's ``--earlyexit_thresholds`` / BranchyNet's cut-offs
are: values of H in nats, one per early exit; a sample exits when H <= t (Distiller writes H < t;
the two differ only for a sample exactly on the threshold).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from eenn.errors import EENNError
from eenn.policies.base import State, register
from eenn.policies.features import entropy_score, neg_log_max_prob_score
from eenn.policies.threshold import ThresholdPolicy

CRITERIA = {"entropy": entropy_score, "cross_entropy": neg_log_max_prob_score}


@register("entropy")
class EntropyPolicy(ThresholdPolicy):
    examples: ClassVar[tuple[dict[str, Any], ...]] = ({}, {"criterion": "cross_entropy"})

    def __init__(self, thresholds: list[float] | None = None, criterion: str = "entropy") -> None:
        super().__init__(thresholds)
        if criterion not in CRITERIA:
            raise EENNError(f"policy.criterion must be one of {sorted(CRITERIA)}, got {criterion!r}.")
        self.criterion = criterion

    def score(self, k: int, logits_k: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return CRITERIA[self.criterion](logits_k), state

    def config_threshold(self, t: float) -> float:
        return 1.0 - t / math.log(self.num_classes)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "criterion": self.criterion}
