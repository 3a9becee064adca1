"""Confidence features shared by every policy, computed from one exit's logits (B, C).

Every feature is a row-wise computation in float32: a sample's value never depends on which
other samples share its batch, so a threshold fitted on the full validation matrix is met
bit for bit when offline simulation or the engine evaluates a compacted subset.
"""

from __future__ import annotations

import math

import torch


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes, (B, C)."""
    return torch.softmax(logits, dim=-1, dtype=torch.float32)  # casts inside the op: one dispatch fewer than .float()


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """Maximum class probability (MSDNet; EENet eq. 2), (B,) in [1/C, 1]."""
    return probabilities(logits).amax(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the softmax in nats (BranchyNet's criterion), (B,) in [0, log C]."""
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    return -(logp.exp() * logp).sum(-1)


def entropy_score(logits: torch.Tensor) -> torch.Tensor:
    """Normalised entropy score c = 1 + sum_c p log p / log C (EENet eq. 3), (B,) in [0, 1];
    1 = one-hot (confident), 0 = uniform."""
    return 1.0 - entropy(logits) / math.log(logits.shape[-1])


def margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability, (B,) in [0, 1]."""
    top2 = probabilities(logits).topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def neg_log_max_prob(logits: torch.Tensor) -> torch.Tensor:
    """-log(max p): Distiller's cross-entropy of an exit against its own prediction (no labels
    needed at inference), (B,) in [0, log C]."""
    return -torch.log_softmax(logits, dim=-1, dtype=torch.float32).amax(-1)


def neg_log_max_prob_score(logits: torch.Tensor) -> torch.Tensor:
    """1 - (-log max p) / log C, the cross-entropy criterion on the entropy score's [0, 1] scale."""
    return 1.0 - neg_log_max_prob(logits) / math.log(logits.shape[-1])


def vote(predictions: torch.Tensor) -> torch.Tensor:
    """Vote agreement after exits 0..k (EENet eq. 4): the largest number of those k+1 exits that
    predict one same class, divided by k+1. ``predictions`` (B, k+1) holds their argmax classes."""
    agree = (predictions[:, :, None] == predictions[:, None, :]).sum(-1)  # (B, k+1): votes for each one's class
    return agree.amax(-1).float() / predictions.shape[1]
