"""EENet's scheduler networks: g_k, h_k and Algorithm 1's alternating losses (see
:mod:`eenn.policies.eenet` for the formulas), trained by a plain torch loop with early stopping:
a small full-batch optimisation needs no Trainer."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

BCE_EPS = 1e-4
PSTAR_EPS = 1e-6
log = logging.getLogger("eenn.policies.eenet")


class EENetScheduler(nn.Module):
    """g_k and h_k for K exits and C classes, trained by Algorithm 1's alternating losses."""

    def __init__(
        self,
        num_exits: int,
        num_classes: int,
        hidden_ratio: float = 0.5,
        beta_h: float = 1.0,
        alpha_cost: float = 10.0,
        lr: float = 1e-2,
        detach_scores: bool = True,
    ) -> None:
        super().__init__()
        self.num_exits, self.beta_h, self.alpha_cost, self.lr = num_exits, beta_h, alpha_cost, lr
        self.detach_scores = detach_scores
        dims = [num_classes + 3 + k for k in range(num_exits)]
        self.g = nn.ModuleList(nn.Linear(d, 1) for d in dims)
        self.h = nn.ModuleList(
            nn.Sequential(
                nn.Linear(d, max(1, round(hidden_ratio * d))), nn.ReLU(), nn.Linear(max(1, round(hidden_ratio * d)), 1)
            )
            for d in dims
        )
        with torch.no_grad():
            for g in self.g:  # start as the max probability (feature index C)
                g.weight.zero_()
                g.weight[0, num_classes] = 1.0
                g.bias.zero_()
        self.costs = torch.zeros(num_exits, dtype=torch.float64)
        self.budget = 1.0

    def linear_score(self, k: int, feats: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """psi^T x_k before the clamp, x_k = [feats (B, C + 3), prev (B, k): the earlier exits'
        scores]. Written as row-wise product-sums (not a matmul, whose blocking depends on the
        batch size) so a sample's score is the same in any batch; and without concatenating x_k,
        which for a large validation set would copy every exit's features once more."""
        w = self.g[k].weight[0]
        width = feats.shape[1]
        out = (feats * w[:width]).sum(-1)
        if prev.shape[1]:  # exit 0 has no earlier scores (a sum over none adds 0)
            out = out + (prev * w[width:]).sum(-1)
        return out + self.g[k].bias[0]

    def scores(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` (B, K, C + 3) -> exit scores q (B, K), each exit seeing the earlier ones;
        with ``detach_scores`` (the authors' code) as constants, so exit k's BCE trains g_k alone,
        else with their gradient, so it trains g_0..g_{k-1} too."""
        q = inputs.new_zeros(len(inputs), 0)
        for k in range(self.num_exits):
            prev = q.detach() if self.detach_scores else q
            q = torch.cat([q, self.linear_score(k, inputs[:, k], prev).clamp(0.0, 1.0)[:, None]], 1)
        return q

    def assignment_logits(self, inputs: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """h_k(x_k) for every exit, (B, K); h_k's first layer applied to the parts of x_k in turn
        (the same map as on their concatenation, without copying the features)."""
        logits = []
        for k in range(self.num_exits):
            first, relu, last = self.h[k]
            width = inputs.shape[2]
            z = F.linear(inputs[:, k], first.weight[:, :width], first.bias) + F.linear(
                q[:, :k], first.weight[:, width:]
            )
            logits.append(last(relu(z))[:, 0])
        return torch.stack(logits, 1)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``inputs`` (B, K, C + 3) -> exit scores q (B, K) and assignment logits (B, K); h sees
        the scores detached (it is optimised with g fixed, and g with h fixed)."""
        q = self.scores(inputs)
        return q, self.assignment_logits(inputs, q.detach())

    def losses(self, inputs: torch.Tensor, correct: torch.Tensor, train: str) -> tuple[torch.Tensor, torch.Tensor]:
        """L_g and L_h; only the network that ``train`` names ("g" or "h") keeps a graph: each
        loss treats the other network's outputs as constants, and a graph of both would hold
        a second copy of activations as large as the features."""
        with torch.set_grad_enabled(train == "g"):
            q = self.scores(inputs)
        with torch.set_grad_enabled(train == "h"):
            r_logits = self.assignment_logits(inputs, q.detach())
        r = torch.softmax(r_logits, 1)
        w = (r / r.sum(0, keepdim=True)).detach()
        bce = F.binary_cross_entropy(q * (1 - 2 * BCE_EPS) + BCE_EPS, correct, reduction="none")
        loss_g = (w * bce).sum() / self.num_exits
        log_pstar = torch.log_softmax(q.detach().clamp_min(PSTAR_EPS).log() / self.beta_h, 1)
        kl = (log_pstar.exp() * (log_pstar - torch.log_softmax(r_logits, 1))).mean()
        spent = (r * self.costs.to(r)).sum(1).mean()
        loss_h = kl + self.alpha_cost * (self.budget - spent).abs() / self.budget
        return loss_g, loss_h

    def fit(self, batches: Batches, max_epochs: int, patience: int, min_delta: float, progress: bool = False) -> int:
        """Algorithm 1, lines 4-6: per batch one Adam step on g, then one on h (which sees the
        updated g), until the epoch's loss (L_g + L_h after h's step, averaged over the samples)
        has not fallen below its best minus ``min_delta`` for ``patience`` epochs, or
        ``max_epochs``; returns the epochs run."""
        opt_g = torch.optim.Adam(self.g.parameters(), lr=self.lr)
        opt_h = torch.optim.Adam(self.h.parameters(), lr=self.lr)
        self.train()
        best, waited = math.inf, 0
        for epoch in range(max_epochs):
            total, count = 0.0, 0
            for inputs, correct in batches:
                loss_g, _ = self.losses(inputs, correct, "g")
                opt_g.zero_grad()
                loss_g.backward()
                opt_g.step()
                loss_g, loss_h = self.losses(inputs, correct, "h")
                opt_h.zero_grad()
                loss_h.backward()
                opt_h.step()
                total += float((loss_g + loss_h).detach()) * len(inputs)
                count += len(inputs)
            loss = total / count
            if progress and (epoch + 1) % max(1, max_epochs // 10) == 0:
                log.info("eenet scheduler: epoch %d/%d, loss %.5f", epoch + 1, max_epochs, loss)
            if loss < best - min_delta:
                best, waited = loss, 0
            else:
                waited += 1
                if waited >= patience:
                    return epoch + 1
        return max_epochs


class Batches(torch.utils.data.IterableDataset):
    """The validation predictions as (inputs, correct) batches: all of them at once by default."""

    def __init__(self, inputs: torch.Tensor, correct: torch.Tensor, batch_size: int | None, seed: int) -> None:
        self.inputs, self.correct, self.batch_size = inputs, correct, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.inputs)
        if self.batch_size is None or self.batch_size >= n:
            yield self.inputs, self.correct
            return
        for idx in torch.randperm(n, generator=self.gen).split(self.batch_size):
            yield self.inputs[idx], self.correct[idx]
