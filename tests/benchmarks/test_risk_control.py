"""benchmarks/risk_control.py's arithmetic on hand-made inputs with known answers: the choice of a
rule, the certified and the passing candidates, the violation count and its exact interval, the
acceptance and the README table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from risk_control import (  # noqa: E402
    acceptance,
    chosen,
    clopper_pearson,
    ltt_passed,
    markdown_table,
    outcome,
    uncertified_passed,
)


def test_chosen_is_the_cheapest_passing_candidate_first_on_ties_and_minus_one_for_none() -> None:
    passed = torch.tensor([[True, True, False], [False, False, False], [False, True, True]])
    cost = torch.tensor([[0.9, 0.5, 0.1], [0.9, 0.5, 0.1], [0.9, 0.4, 0.4]], dtype=torch.float64)
    assert chosen(passed, cost).tolist() == [1, -1, 1]


def test_ltt_certifies_the_leading_run_of_small_p_values_and_the_baseline_every_low_risk() -> None:
    # n = 100, ε = 0.1: P(Bin(100, 0.1) <= c) is 2.7e-5, 0.058, 0.999, 2.7e-5 for c = 0, 5, 20, 0
    counts = torch.tensor([[0.0, 5.0, 20.0, 0.0]], dtype=torch.float64)
    assert ltt_passed(counts, 100, 0.1, 0.1).tolist() == [[True, True, False, False]]
    assert ltt_passed(counts, 100, 0.1, 0.05).tolist() == [[True, False, False, False]]
    assert uncertified_passed(counts, 100, 0.1).tolist() == [[True, True, False, True]]
    assert uncertified_passed(counts, 100, 0.05).tolist() == [[True, True, False, True]]
    assert uncertified_passed(counts, 100, 0.049).tolist() == [[True, False, False, True]]


def test_clopper_pearson_matches_closed_forms_and_a_table_value() -> None:
    lo, hi = clopper_pearson(0, 60)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 60), rel=1e-9)  # k = 0: 1 - (α/2)^(1/n)
    lo, hi = clopper_pearson(4, 4)
    assert lo == pytest.approx(0.025 ** (1 / 4), rel=1e-9) and hi == 1.0
    assert clopper_pearson(1, 4)[0] == pytest.approx(1 - 0.975 ** (1 / 4), rel=1e-9)  # k = 1: the lower end
    assert clopper_pearson(5, 10) == pytest.approx((0.1871, 0.8129), abs=1e-4)


def test_outcome_counts_pool_risk_above_epsilon_and_scores_a_refusal_as_no_loss_at_full_cost() -> None:
    # four draws, three candidates: each draw's choice, per-candidate risk and cost on the pool
    j = torch.tensor([0, -1, 2, 1])
    risk = torch.tensor(
        [[0.011, 0.02, 0.03], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0101], [0.0, 0.01, 0.02]], dtype=torch.float64
    )
    cost = torch.tensor([[0.9, 0.6, 0.3], [0.2, 0.2, 0.2], [0.9, 0.6, 0.3], [0.9, 0.6, 0.3]], dtype=torch.float64)
    o = outcome(j, risk, cost, epsilon=0.01, delta=0.1)
    # risks 0.011, 0 (refused), 0.0101, 0.01: two above ε (equal to ε is no violation)
    assert o["violations"] == 2 and o["violation_rate"] == 0.5
    assert o["ci95"] == list(clopper_pearson(2, 4))
    assert o["within_delta"] and not o["above_delta"]  # the interval of 2 in 4 reaches down past 0.1
    assert o["mean_pool_risk"] == pytest.approx((0.011 + 0 + 0.0101 + 0.01) / 4)
    assert o["max_pool_risk"] == 0.011
    assert o["mean_cost_saved"] == pytest.approx(1 - (0.9 + 1.0 + 0.3 + 0.6) / 4)
    assert o["refused_rate"] == 0.25


def test_outcome_above_delta_when_the_whole_interval_is() -> None:
    draws = 200
    j = torch.zeros(draws, dtype=torch.int64)
    risk = torch.zeros(draws, 1, dtype=torch.float64)
    risk[:60] = 0.05  # 60 of 200 violate at ε = 0.02: 30 %, interval about [24 %, 37 %]
    o = outcome(j, risk, torch.ones(draws, 1, dtype=torch.float64), epsilon=0.02, delta=0.1)
    assert o["violations"] == 60 and o["above_delta"] and not o["within_delta"]
    assert o["ci95"][0] == pytest.approx(0.2377, abs=1e-3) and o["mean_cost_saved"] == 0.0


def _row(eps: float, ltt_within: bool, base_above: bool) -> dict:
    return {
        "epsilon": eps,
        "ltt": {"within_delta": ltt_within, "above_delta": not ltt_within},
        "uncertified_maxprob": {"within_delta": not base_above, "above_delta": base_above},
    }


def test_acceptance_covers_the_certified_modes_only() -> None:
    results = {
        "raw": {"results": {"drop": [_row(0.01, True, False), _row(0.02, True, True)]}},
        "calibrated": {"results": {"drop": [_row(0.01, True, False)]}},
        # the leaky mode's guarantee is void: a violation there is a measurement, not a failure
        "calibrated_leaky": {"results": {"drop": [_row(0.01, False, True)]}},
    }
    a = acceptance(results)
    assert a["modes"] == ["raw", "calibrated"]
    assert a["ltt_within_delta_everywhere"] and a["ltt_rows_above_delta"] == []
    assert a["uncertified_rows_above_delta"] == [{"mode": "raw", "loss": "drop", "epsilon": 0.02}]
    results["calibrated"]["results"]["drop"].append(_row(0.05, False, False))
    a = acceptance(results)
    assert not a["ltt_within_delta_everywhere"]
    assert a["ltt_rows_above_delta"] == [{"mode": "calibrated", "loss": "drop", "epsilon": 0.05}]


def test_the_readme_table_gives_percentages_with_their_interval() -> None:
    o = {"violation_rate": 0.034, "ci95": [0.0236, 0.0472], "mean_pool_risk": 0.00456, "mean_cost_saved": 0.2219}
    results = {"raw": {"results": {"drop": [{"epsilon": 0.005, "ltt": o, "uncertified_maxprob": o}]}}}
    lines = markdown_table(results).splitlines()
    assert len(lines) == 3
    assert lines[2] == "| raw | drop | 0.5 | 3.4 [2.4, 4.7] | 0.46 | 22.2 | 3.4 [2.4, 4.7] | 0.46 | 22.2 |"
