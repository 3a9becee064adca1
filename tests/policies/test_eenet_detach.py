"""EENet's scheduler passes the earlier exits' scores on to g_k as constants by default, as the
authors' code does (git-disl/EENet, utils/predict_helpers.py: ``score[k_].detach()``), and with
their gradient under ``detach_scores=false`` (eenn before issue 27)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from eenn.errors import EENNError
from eenn.policies import ExitPolicy, build_policy
from eenn.predictions import Predictions

from .helpers import EENET_FAST


@pytest.mark.parametrize("detach", [True, False])
def test_the_last_exits_loss_trains_the_earlier_scorers_only_without_detaching(detach: bool) -> None:
    from eenn.policies.eenet_scheduler import EENetScheduler

    K, C = 4, 5
    sched = EENetScheduler(K, C, detach_scores=detach)
    with torch.no_grad():
        for g in sched.g[1:]:  # every later scorer reads the earlier scores (at init it ignores them)
            g.weight[0, C + 3 :] = 0.1
    inputs = torch.rand(64, K, C + 3, generator=torch.Generator().manual_seed(0)) * 0.5
    q = sched.scores(inputs)
    assert bool(((q > 0) & (q < 1)).all())  # no score clamped: a gradient could flow through every one
    F.binary_cross_entropy(q[:, -1], torch.ones(64)).backward()  # the last exit's loss alone
    assert sched.g[-1].weight.grad.abs().sum() > 0
    for g in sched.g[:-1]:
        reached = g.weight.grad is not None and bool(g.weight.grad.abs().sum() > 0)
        assert reached is not detach


def test_the_policy_hands_detach_scores_to_its_scheduler_and_keeps_it_in_its_file(val: Predictions, tmp_path) -> None:
    assert build_policy("eenet").hparams()["detach_scores"] is True  # the authors' default
    policy = build_policy("eenet", detach_scores=False, **EENET_FAST).fit(val, 0.6 * float(val.costs[-1]), "flops")
    assert policy.scheduler.detach_scores is False
    loaded = ExitPolicy.load(policy.save(tmp_path / "p.safetensors"))
    assert loaded.hparams()["detach_scores"] is False
    with pytest.raises(EENNError, match="policy.detach_scores must be true or false, got 'yes'"):
        build_policy("eenet", detach_scores="yes")
