"""Vote policy, EENet's "PABEE" baseline (sec. 4.2): the agreement score of eq. 4 (the largest
share of exits 0..k that predict one class) with thresholds fitted by MSDNet's rule.

Scores take few values (multiples of 1/(k+1)), so ties are common and realised exit fractions
differ from the intended ones; the budget is still met, since it is checked on the realised
assignment.
"""

from __future__ import annotations

import torch

from eenn.policies.base import State, register
from eenn.policies.features import vote
from eenn.policies.threshold import ThresholdPolicy


@register("vote")
class VotePolicy(ThresholdPolicy):
    def init_state(self, n: int) -> State:
        return {"preds": torch.full((n, self._require_fitted()), -1, dtype=torch.int64, device=self.device)}

    def score(self, k: int, logits_k: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        preds = state["preds"].clone()
        preds[:, k] = logits_k.argmax(-1)
        return vote(preds[:, : k + 1]), {"preds": preds}
