"""Thresholds for a budget: hand-built cases with known answers, and a property test."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eenn.errors import EENNError
from eenn.evaluation.offline import evaluate
from eenn.policies import POLICIES, build_policy, policy_class
from eenn.policies.budget import assign, fit_to_budget, thresholds_for_counts, tilted_fractions
from eenn.policies.features import max_prob

from .helpers import logits_for_max_prob, predictions


def test_thresholds_for_counts_walks_the_exits_in_order() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.2, 0.9, 0.0], [0.1, 0.6, 0.0]])
    t = thresholds_for_counts(scores, [2, 1])
    # exit 0: the two best (0.9, 0.8) exit, t0 = 0.8; exit 1: the best remaining (0.9), t1 = 0.9
    assert t.tolist()[:2] == pytest.approx([0.8, 0.9])
    assert t[2] == -math.inf
    assert assign(scores, t).tolist() == [0, 0, 1, 2]
    assert thresholds_for_counts(scores, [0, 0])[0] == math.inf  # nobody exits: +inf


def test_tilted_fractions_geometric_and_extremes() -> None:
    pi = tilted_fractions(torch.ones(3, dtype=torch.float64), math.log(2.0))
    assert pi.tolist() == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert tilted_fractions(torch.ones(3), -math.inf).tolist() == [1.0, 0.0, 0.0]
    assert tilted_fractions(torch.ones(3), math.inf).tolist() == [0.0, 0.0, 1.0]


def _two_exit(p0: list[float], correct0: list[bool]):
    """Two exits costing 1 and 2; exit 0 predicts class 0 with confidence p0[i]; exit 1 is always right."""
    n = len(p0)
    labels = [0 if c else 1 for c in correct0]
    e0 = logits_for_max_prob(p0, [0] * n)
    e1 = logits_for_max_prob([0.99] * n, labels)
    return predictions(torch.stack([e0, e1], 1), labels, [1.0, 2.0])


def test_two_exits_known_threshold_and_accuracy() -> None:
    # the 5 most confident samples are right at exit 0, the rest wrong: at budget 1.5 exactly five
    # may stay for exit 1, so the best (and MSDNet's) threshold is the 5th highest confidence
    p0 = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.51]
    val = _two_exit(p0, [True] * 5 + [False] * 5)
    policy = build_policy("maxprob").fit(val, 1.5, "flops")
    s = max_prob(val.logits[:, 0])
    assert policy.thresholds[0] == s[4]
    S = evaluate(policy, val, "flops")
    assert S["avg_cost"] == pytest.approx(1.5)
    assert S["accuracy"] == 1.0
    assert S["exit_fractions"] == [0.5, 0.5]


def test_two_exits_ties_keep_the_realised_cost_under_budget() -> None:
    # budget 1.45 wants 6 exits at exit 0, but the 6th and 7th scores tie: exiting 7 (cost 1.3) is
    # the largest realised cost within the budget, exiting 5 would cost 1.5
    p0 = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.7, 0.6, 0.55, 0.51]
    val = _two_exit(p0, [True] * 10)
    policy = build_policy("maxprob").fit(val, 1.45, "flops")
    S = evaluate(policy, val, "flops")
    assert S["avg_cost"] == pytest.approx(1.3)
    assert policy.thresholds[0] == max_prob(val.logits[:, 0])[5]


def test_budget_below_the_first_exit_is_refused() -> None:
    scores = torch.rand(10, 2)
    with pytest.raises(EENNError, match="below the cheapest possible average cost 1"):
        fit_to_budget(scores, torch.ones(2), torch.tensor([1.0, 2.0], dtype=torch.float64), 0.5)


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 40),
    k=st.integers(2, 4),
    rounding=st.sampled_from(["floor", "round"]),
)
def test_fitted_thresholds_never_exceed_the_budget_on_their_data(data, n: int, k: int, rounding: str) -> None:
    # few distinct score values: many ties
    values = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])
    scores = torch.tensor(data.draw(st.lists(st.lists(values, min_size=k, max_size=k), min_size=n, max_size=n)))
    steps = data.draw(st.lists(st.floats(0.0, 5.0), min_size=k - 1, max_size=k - 1))
    costs = torch.tensor([1.0] + steps, dtype=torch.float64).cumsum(0)
    budget = data.draw(st.floats(1.0, float(costs[-1]) + 1.0))
    base = torch.tensor(data.draw(st.lists(st.floats(0.01, 1.0), min_size=k, max_size=k)), dtype=torch.float64)
    t, info = fit_to_budget(scores.float(), base, costs, budget, rounding)
    realised = float(costs[assign(scores.float(), t)].mean())
    assert realised <= budget * (1 + 1e-9)
    assert realised == pytest.approx(info["val_cost"])


BUDGETED = [name for name in POLICIES.names() if policy_class(name).budgeted]


@pytest.mark.parametrize("name", BUDGETED)
@settings(max_examples=25, deadline=None)
@given(data=st.data(), n=st.integers(2, 30))
def test_policies_fitted_for_a_budget_meet_it_on_validation(data, n: int, name: str) -> None:
    # coarse logits (ties), three exits with head costs: checked through the real simulation
    logits = torch.tensor(data.draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0, 2.0]), min_size=n * 9, max_size=n * 9)))
    labels = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    val = predictions(logits.reshape(n, 3, 3), labels, [1.0, 2.0, 3.0], [0.1, 0.1, 0.0])
    policy = build_policy(name, **policy_class(name).examples[0])
    lo = policy.cheapest_cost(val, "flops")
    budget = data.draw(st.floats(lo, 3.0))
    policy.fit(val, budget, "flops")
    assert evaluate(policy, val, "flops")["avg_cost"] <= budget * (1 + 1e-9)
