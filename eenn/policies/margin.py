"""Margin policy: exit when the top-1 minus top-2 probability reaches the exit's threshold."""

from __future__ import annotations

import torch

from eenn.policies.base import State, register
from eenn.policies.features import margin
from eenn.policies.threshold import ThresholdPolicy


@register("margin")
class MarginPolicy(ThresholdPolicy):
    def score(self, k: int, logits_k: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return margin(logits_k), state
