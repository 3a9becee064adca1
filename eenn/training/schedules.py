"""Learning-rate schedules that torch does not name: built from torch's own, stepped per epoch."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR


def warmup_cosine(
    optimizer: Optimizer, warmup_epochs: int, max_epochs: int, start_factor: float = 1e-3, eta_min: float = 0.0
) -> LRScheduler:
    """The ViT/DeiT schedule: the LR rises linearly from ``start_factor`` x LR to LR over
    ``warmup_epochs``, then anneals along a cosine to ``eta_min`` at ``max_epochs``."""
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, max_epochs - warmup_epochs), eta_min=eta_min)
    if warmup_epochs <= 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_epochs)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_epochs])


def two_phase_cosine(optimizer: Optimizer, first_epochs: int, max_epochs: int, eta_min: float = 0.0) -> LRScheduler:
    """Two cosine annealings, the second restarting at the full LR: over ``first_epochs``, then over
    the rest (the mixed regime trains the backbone alone in the first, every exit in the second)."""
    first = CosineAnnealingLR(optimizer, T_max=max(1, first_epochs), eta_min=eta_min)
    if not 0 < first_epochs < max_epochs:
        return CosineAnnealingLR(optimizer, T_max=max(1, max_epochs), eta_min=eta_min)
    second = CosineAnnealingLR(optimizer, T_max=max_epochs - first_epochs, eta_min=eta_min)
    return SequentialLR(optimizer, [first, second], milestones=[first_epochs])
