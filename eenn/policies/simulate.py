"""Offline simulation of an exit policy on saved logits, and the realised cost of an exit assignment.

:func:`simulate` runs the policy exactly as the online engine does: exit by exit, asking the
policy's ``decide`` about the compacted subset of samples whose next exit is k, and carrying
their per-sample state along. Only the network is replaced by the saved logits. Policies fit
their budgets with it, evaluation scores them with it, and the engine is checked against it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from eenn.errors import EENNError
from eenn.predictions import block_rows

if TYPE_CHECKING:
    from eenn.policies.base import ExitPolicy


def simulate(
    policy: ExitPolicy, logits: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk exits 0..K-1 on logits (N, K, C). Returns ``exit_idx`` (N,) int64, the exit each
    sample answers at, and ``heads_evaluated`` (N, K) bool, the heads it evaluated. ``labels`` are
    only read by offline-only policies (the oracles)."""
    n, K, C = logits.shape
    if (policy.num_exits, policy.num_classes) != (K, C):
        raise EENNError(
            f"policy {policy.name!r} was fitted on K={policy.num_exits} exits and C={policy.num_classes} classes, "
            f"the predictions have K={K} and C={C}."
        )
    state = policy.offline_state(logits, labels)
    dev = logits.device
    exit_idx = torch.full((n,), -1, dtype=torch.int64, device=dev)
    heads = torch.zeros(n, K, dtype=torch.bool, device=dev)
    # in row blocks: every sample's decisions depend on its own logits and state only, and a
    # large file's per-exit copies (softmax, features) then take a block's memory, not N rows'
    rows = block_rows(logits)
    for a in range(0, n, rows):
        block = slice(a, a + rows)
        _walk(policy, logits[block], {name: v[block] for name, v in state.items()}, exit_idx[block], heads[block])
    return exit_idx, heads


def _walk(
    policy: ExitPolicy,
    logits: torch.Tensor,
    state: dict[str, torch.Tensor],
    exit_idx: torch.Tensor,
    heads: torch.Tensor,
) -> None:
    """Walk exits 0..K-1 for the samples of ``logits``, writing into ``exit_idx`` and ``heads``."""
    n, K, _ = logits.shape
    next_exit = torch.zeros(n, dtype=torch.int64, device=logits.device)
    for k in range(K):
        idx = (next_exit == k).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        sub = {name: v.index_select(0, idx) for name, v in state.items()}
        d = policy.decide(k, logits[:, k].index_select(0, idx), sub)
        heads[idx, k] = True
        going = ~d.exit
        if bool((d.next_exit[going] <= k).any()):
            raise RuntimeError(f"policy {policy.name!r} sent samples at exit {k} back to an earlier exit")
        exit_idx[idx[d.exit]] = k
        next_exit[idx] = torch.where(d.exit, torch.full_like(d.next_exit, K), d.next_exit)
        for name, v in d.state.items():
            state[name][idx] = v


def realised_cost(
    exit_idx: torch.Tensor, heads_evaluated: torch.Tensor, costs: torch.Tensor, head_costs: torch.Tensor
) -> torch.Tensor:
    """Per-sample cost (N,) float64: the cost of reaching its exit (which includes every head up
    to it) minus the heads it skipped. Written this way a sample that evaluated every head pays
    exactly ``costs[exit]``, with no rounding."""
    K = costs.numel()
    upto = torch.arange(K)[None, :] <= exit_idx[:, None]
    skipped = (upto & ~heads_evaluated).double() @ head_costs.double()
    return costs.double()[exit_idx] - skipped
