"""Confidence features: values on hand-built logits, and batch invariance."""

from __future__ import annotations

import math

import pytest
import torch

from eenn.policies import features as F


def test_max_prob_entropy_margin_and_cross_entropy() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(7.0), 0.0, 0.0, 0.0]])  # uniform; p = .7, .1, .1, .1
    assert F.max_prob(logits).tolist() == pytest.approx([0.25, 0.7])
    assert F.margin(logits).tolist() == pytest.approx([0.0, 0.6])
    h = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))
    assert F.entropy(logits).tolist() == pytest.approx([math.log(4), h], rel=1e-5)
    assert F.entropy_score(logits).tolist() == pytest.approx([0.0, 1 - h / math.log(4)], abs=1e-6)
    assert F.neg_log_max_prob(logits).tolist() == pytest.approx([math.log(4), -math.log(0.7)], rel=1e-5)


def test_entropy_score_of_a_one_hot_is_one_without_nan() -> None:
    logits = torch.tensor([[200.0, 0.0, 0.0]])  # p underflows to exact zeros
    assert F.entropy_score(logits).item() == pytest.approx(1.0)
    assert torch.isfinite(F.entropy(logits)).all()


def test_vote_is_the_largest_agreeing_share_of_the_exits_so_far() -> None:
    # EENet eq. 4: (1/k) max_c sum_k' 1[pred_k' = c] over exits 1..k
    preds = torch.tensor([[3, 3, 1], [0, 1, 2], [5, 2, 5], [4, 4, 4]])
    assert F.vote(preds).tolist() == pytest.approx([2 / 3, 1 / 3, 2 / 3, 1.0])
    assert F.vote(preds[:, :1]).tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("fn", [F.max_prob, F.entropy_score, F.margin, F.neg_log_max_prob_score])
def test_features_do_not_depend_on_the_batch(fn) -> None:
    logits = torch.randn(3000, 10, generator=torch.Generator().manual_seed(0)) * 3
    full = fn(logits)
    idx = torch.tensor([5, 17, 2999, 1024])
    assert torch.equal(fn(logits.index_select(0, idx)), full[idx])
    assert all(torch.equal(fn(logits[i : i + 1]), full[i : i + 1]) for i in idx.tolist())
