"""Switching between policies fitted for several budgets keeps a shifted test stream on budget."""

from __future__ import annotations

import pytest

from eenn.errors import EENNError
from eenn.evaluation.offline import evaluate
from eenn.policies import build_policy
from eenn.policies.switcher import BudgetSwitcher
from eenn.policies.synthetic import synthetic_predictions


@pytest.mark.parametrize("shift", [0.3, -0.3])
def test_switching_tracks_the_target_on_a_shifted_test_set(shift: float, val) -> None:
    full = float(val.costs[-1])
    target = 0.6 * full
    switcher = BudgetSwitcher.fit(val, [f * full for f in (0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)], "flops", "maxprob")
    test = synthetic_predictions(4000, seed=5, difficulty_shift=shift)  # harder / easier than val
    fixed = evaluate(switcher.policies[switcher.closest(target)], test, "flops")
    out = switcher.run(test, target, "flops", batch_size=200)
    assert abs(out["avg_cost"] - target) < 0.5 * abs(fixed["avg_cost"] - target)
    # the stream meets its average budget (measured: 0.9996 and 0.989 of it), spending nearly all of it
    assert 0.98 * target <= out["avg_cost"] <= target
    assert out["switches"] >= 1
    assert len(out["policy_per_batch"]) == 20


def test_switcher_needs_budgeted_policies(val) -> None:
    with pytest.raises(EENNError, match="each fitted to a budget"):
        BudgetSwitcher([build_policy("static").fit(val, None, "flops")])
