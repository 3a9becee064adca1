"""Stage-1 losses: per-exit loss weights and EENet's self-distillation term (sec. 3.1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from eenn.errors import EENNError


def exit_loss_weights(spec: str | Sequence[float], num_exits: int) -> torch.Tensor:
    """Weights w_k of the joint loss sum_k w_k CE_k.

    ``uniform``: 1/K each. ``eenet``: k/(K(K+1)) (EENet sec. 3.1). A list of K weights is taken as
    it is; a list of K-1 weights is Distiller's ``--earlyexit_lossweights`` (the early exits'),
    the last exit taking 1 - their sum.
    """
    k = num_exits
    if isinstance(spec, str):
        if spec == "uniform":
            return torch.full((k,), 1.0 / k)
        if spec == "eenet":
            return torch.arange(1, k + 1, dtype=torch.float32) / (k * (k + 1))
        raise EENNError(f"training.loss_weights must be 'uniform', 'eenet' or a list of numbers, got {spec!r}.")
    w = [float(v) for v in spec]
    if len(w) == k - 1:
        w.append(1.0 - sum(w))
    if len(w) != k:
        raise EENNError(
            f"training.loss_weights has {len(spec)} values; the network has {k} exits (give {k} or {k - 1})."
        )
    if any(v < 0 for v in w) or sum(w) <= 0:
        raise EENNError(f"training.loss_weights must be non-negative with a positive sum, got {w}.")
    return torch.tensor(w)


#: how the KL is reduced over classes and batch: ``batchmean`` sums over classes and averages over
#: the batch (the KL itself, as EENet's sec. 3.1 writes it); ``mean`` averages over classes too (it
#: is ``batchmean`` / C), what ``torch.nn.KLDivLoss()``'s default reduction gives and the EENet
#: authors' train.py uses
KL_REDUCTIONS = ("batchmean", "mean")


def self_distillation_kl(
    logits: torch.Tensor, tau: float, detach_teacher: bool = True, reduction: str = "batchmean"
) -> torch.Tensor:
    """sum_{k<K} tau^2 KL(softmax(z_K/tau) || softmax(z_k/tau)), averaged over the batch, and with
    ``reduction="mean"`` over the C classes too (see :data:`KL_REDUCTIONS`).

    ``logits``: (B, K, C). The last exit is the teacher; detaching it (default) keeps the
    distillation from pulling the final exit towards the weaker early ones.
    """
    if reduction not in KL_REDUCTIONS:
        raise EENNError(f"training.kl_reduction must be one of {KL_REDUCTIONS}, got {reduction!r}.")
    teacher = logits[:, -1]
    if detach_teacher:
        teacher = teacher.detach()
    log_p_teacher = F.log_softmax(teacher / tau, dim=-1)  # (B, C)
    log_p_students = F.log_softmax(logits[:, :-1] / tau, dim=-1)  # (B, K-1, C)
    kl = (log_p_teacher.exp()[:, None] * (log_p_teacher[:, None] - log_p_students)).sum(-1)  # (B, K-1)
    per_class = logits.shape[-1] if reduction == "mean" else 1
    return tau**2 * kl.sum(-1).mean() / per_class
