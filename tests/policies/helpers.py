"""Hand-built predictions and a naive reference simulation for the policy tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from eenn.policies.base import ExitPolicy
from eenn.policies.eenet import EENetPolicy
from eenn.predictions import Predictions

#: EENet settings that train briefly (the defaults train longer)
EENET_FAST = EENetPolicy.examples[0]


def logits_for_max_prob(p: Sequence[float], pred: Sequence[int]) -> torch.Tensor:
    """Two-class logits (B, 2) whose softmax puts probability p[i] on class pred[i]."""
    p_t = torch.tensor(p, dtype=torch.float64)
    a = torch.log(p_t / (1 - p_t))
    out = torch.zeros(len(p), 2, dtype=torch.float64)
    out[torch.arange(len(p)), torch.tensor(pred)] = a
    return out.float()


def predictions(
    logits: torch.Tensor, labels: Sequence[int], costs: Sequence[float], head_costs: Sequence[float] | None = None
) -> Predictions:
    preds = Predictions(
        logits=logits,
        labels=torch.tensor(labels),
        costs=torch.tensor(costs, dtype=torch.float64),
        head_costs=None if head_costs is None else torch.tensor(head_costs, dtype=torch.float64),
    )
    preds.validate()
    return preds


def naive_simulate(policy: ExitPolicy, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample at a time, following next_exit: the reference for the compacting simulation."""
    n, K, _ = logits.shape
    full = policy.offline_state(logits, labels)
    exit_idx = torch.empty(n, dtype=torch.int64)
    heads = torch.zeros(n, K, dtype=torch.bool)
    for i in range(n):
        state = {name: v[i : i + 1].clone() for name, v in full.items()}
        k = 0
        while True:
            heads[i, k] = True
            d = policy.decide(k, logits[i : i + 1, k], state)
            state = d.state
            if bool(d.exit[0]):
                exit_idx[i] = k
                break
            k = int(d.next_exit[0])
    return exit_idx, heads
