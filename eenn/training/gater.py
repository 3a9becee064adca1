"""The gater of budget-aware training (Budget-aware EENN, sec. 3): an MLP that reads confidence
features of exit k's softmax and says how likely a sample is to stop there.

P^k = sigmoid(MLP(s^k)) for the K-1 early exits (the last exit takes whoever is left), then

- Pr(k|x) = P^k prod_{j<k} (1 - P^j), and prod_{j<K} (1 - P^j) at the last exit   (eq. 5)
- A^k = Pr(k|x)^(1/T) / sum_j Pr(j|x)^(1/T)                                       (eq. 9)

Both are computed in log space (log-sigmoid, cumulative sums, a softmax of log Pr / T): the same
values as the formulas, without underflow when many exits multiply small probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from eenn.errors import EENNError

FEATURES = ("confidence", "entropy", "margin")


def confidence_features(logits: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """Features s^k (..., F) of each softmax in ``logits`` (..., C), in the order of ``names``.

    ``confidence``: max_c p_c (eq. 6). ``margin``: the top probability minus the runner-up (eq. 8).
    ``entropy``: -sum_c p_c log p_c / log C (eq. 7 up to its sign, scaled to [0, 1] so that the
    inputs have the same range for any number of classes; the MLP's first layer absorbs both).
    Differentiable: the inner step's gradient reaches the backbone through them (eq. 11).
    """
    log_p = F.log_softmax(logits, dim=-1)
    p = log_p.exp()
    feats: dict[str, torch.Tensor] = {}
    if "confidence" in names or "margin" in names:
        top2 = p.topk(2, dim=-1).values
        feats["confidence"], feats["margin"] = top2[..., 0], top2[..., 0] - top2[..., 1]
    if "entropy" in names:
        feats["entropy"] = -(p * log_p).sum(-1) / math.log(logits.shape[-1])
    return torch.stack([feats[n] for n in names], dim=-1)


def exit_log_probs(gate_logits: torch.Tensor) -> torch.Tensor:
    """log Pr(k|x) (B, K) from the early exits' gate logits z (B, K-1), P^k = sigmoid(z^k) (eq. 5)."""
    log_stop, log_go = F.logsigmoid(gate_logits), F.logsigmoid(-gate_logits)
    zero = gate_logits.new_zeros(gate_logits.shape[0], 1)
    reached = torch.cat([zero, log_go.cumsum(dim=1)], dim=1)  # log prod_{j<k} (1 - P^j)
    return reached + torch.cat([log_stop, zero], dim=1)


def tempered_exit_distribution(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """A (B, K) = Pr(k|x)^(1/T), normalised over k (eq. 9): T < 1 sharpens, T -> inf is uniform."""
    return torch.softmax(log_probs / temperature, dim=1)


class Gater(nn.Module):
    """phi: one MLP (one hidden layer, ReLU) from s^k to the logit of P^k.

    ``shared=True`` (the paper: one MLP_phi for every exit, P^k_phi = sigmoid(MLP(s^k))) or one MLP
    per early exit. The last exit gets no gate: Pr(K|x) is what the earlier exits leave over.
    """

    def __init__(
        self,
        num_exits: int,
        features: Sequence[str] = ("confidence", "entropy"),
        hidden: int = 500,
        shared: bool = True,
    ) -> None:
        super().__init__()
        features = list(features)
        if not features or len(set(features)) != len(features) or not set(features) <= set(FEATURES):
            raise EENNError(f"training.features must be distinct names from {list(FEATURES)}, got {features}.")
        if num_exits < 2:
            raise EENNError(f"bi-level training needs a network with at least 2 exits, got {num_exits}.")
        if hidden < 1:
            raise EENNError(f"training.gater_hidden must be a positive width, got {hidden}.")
        self.features, self.num_exits, self.shared = features, num_exits, shared
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(len(features), hidden), nn.ReLU(), nn.Linear(hidden, 1))
            for _ in range(1 if shared else num_exits - 1)
        )

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """Gate logits z (B, K-1) for the exits' logits (B, K, C); P^k = sigmoid(z^k)."""
        s = confidence_features(logits[:, :-1], self.features)  # (B, K-1, F)
        if self.shared:
            return self.mlps[0](s).squeeze(-1)
        return torch.cat([mlp(s[:, k]) for k, mlp in enumerate(self.mlps)], dim=1)

    def exit_distribution(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """A (B, K): the tempered probability of each sample leaving at each exit (eq. 5 and 9)."""
        return tempered_exit_distribution(exit_log_probs(self(logits)), temperature)
