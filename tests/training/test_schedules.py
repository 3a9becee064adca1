import math

import pytest
import torch

from eenn.training.schedules import warmup_cosine


def _lrs(epochs: int, **kwargs) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, max_epochs=epochs, **kwargs)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_rises_linearly_then_the_cosine_falls_to_eta_min():
    lrs = _lrs(10, warmup_epochs=4, start_factor=0.1, eta_min=0.0)
    assert lrs[:5] == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0])
    assert lrs[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(6)])


def test_without_warmup_it_is_the_plain_cosine():
    assert _lrs(4, warmup_epochs=0, eta_min=0.0) == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    )
