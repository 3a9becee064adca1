"""MSDNet's policy: exit when the maximum class probability reaches the exit's threshold.

Config ``thresholds`` are probabilities (exit when max p >= t). Distiller's cross-entropy
criterion -log(max p) < t is the same rule with t' = exp(-t); ``entropy`` with
``criterion: cross_entropy`` takes such thresholds directly.
"""

from __future__ import annotations

import torch

from eenn.policies.base import State, register
from eenn.policies.features import max_prob
from eenn.policies.threshold import ThresholdPolicy


@register("maxprob")
class MaxProbPolicy(ThresholdPolicy):
    def score(self, k: int, logits_k: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return max_prob(logits_k), state
