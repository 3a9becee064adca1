"""The benchmarks' own arithmetic on hand-made inputs with known answers: the seed statistics
(eenn.evaluation.stats) behind their comparisons, policy_quality's and deploy_speed's acceptance
and the EENet detach ablation's table (risk_control's and gpu_check's have their own files;
budget_aware.py is tested with its owner's work); step_overhead's pooled rounds and overhead."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from eenn.evaluation.stats import paired_difference, sign_flip_p, summarise, unpaired_difference

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import deploy_speed  # noqa: E402
import policy_quality  # noqa: E402
import step_overhead  # noqa: E402

T_975 = {2: 4.302652730, 3: 3.182446305, 4: 2.776445105}  # Student t quantiles, from tables


def test_summarise_gives_the_mean_sd_and_t_interval() -> None:
    s = summarise([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(5 / 3)
    half = T_975[3] * sd / 2
    assert (s.mean, s.n) == (2.5, 4) and s.std == pytest.approx(sd)
    assert (s.ci_low, s.ci_high) == pytest.approx((2.5 - half, 2.5 + half))
    one = summarise([5.0])
    assert (one.mean, one.std, one.ci_low, one.ci_high) == (5.0, None, None, None)
    with pytest.raises(ValueError):
        summarise([])


def test_paired_difference_is_the_interval_of_the_per_seed_differences() -> None:
    d = paired_difference([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])  # differences 2, 3, 4
    half = T_975[2] * 1.0 / math.sqrt(3)
    assert d.mean == 3.0 and d.paired and d.n == 3
    assert (d.ci_low, d.ci_high) == pytest.approx((3 - half, 3 + half))
    t = 3 / (1 / math.sqrt(3))
    assert d.p_t == pytest.approx(1 - t / math.sqrt(2 + t * t))  # two-sided p of t with 2 degrees of freedom
    assert d.p_sign_flip == 0.25  # of 8 sign patterns, only all + and all - reach |mean| 3
    assert d.verdict == "higher"
    same_shift = paired_difference([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])  # every seed moved by 1: no noise
    assert (same_shift.mean, same_shift.ci_low, same_shift.ci_high, same_shift.p_t) == (1.0, 1.0, 1.0, 0.0)
    assert paired_difference([1.0, 2.0], [2.0, 1.0]).verdict == "no detectable difference"
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_unpaired_difference_is_welchs_interval() -> None:
    d = unpaired_difference([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    se = math.sqrt(2 / 3)  # both variances 1, over 3 samples each; Welch's df is then 4
    assert d.mean == -3.0 and not d.paired
    assert (d.ci_low, d.ci_high) == pytest.approx((-3 - T_975[4] * se, -3 + T_975[4] * se))


def test_the_sign_flip_test_counts_patterns_exactly() -> None:
    assert sign_flip_p([1.0, 2.0, 3.0, 4.0]) == 2 / 16
    assert sign_flip_p([1.0, -1.0]) == 1.0
    assert sign_flip_p([1.0, 1.0, 1.0, -1.0]) == 10 / 16  # |sum| >= 2 unless two signs of four flip (6 of 16)


def test_policy_quality_acceptance_in_points() -> None:
    maxprob = [0.500, 0.600, 0.700, 0.800, 0.900]
    ok = policy_quality.acceptance({"eenet": [0.510, 0.601, 0.698, 0.800, 0.900], "maxprob": maxprob})
    assert ok["eenet_minus_maxprob_points"] == pytest.approx([1.0, 0.1, -0.2, 0.0, 0.0])
    assert ok["within_tolerance_everywhere"] and ok["better_at_tightest_two"] and ok["holds"]
    behind = policy_quality.acceptance({"eenet": [0.510, 0.601, 0.696, 0.800, 0.900], "maxprob": maxprob})
    assert not behind["within_tolerance_everywhere"] and not behind["holds"]  # -0.4 points at the third
    tied = policy_quality.acceptance({"eenet": [0.510, 0.600, 0.700, 0.800, 0.900], "maxprob": maxprob})
    assert tied["within_tolerance_everywhere"] and not tied["better_at_tightest_two"] and not tied["holds"]


def test_deploy_speed_acceptance_applies_each_check_where_it_belongs() -> None:
    row = {"batch_size": 128, "realised_over_predicted": 0.95, "exit_fractions": [0.5, 0.5], "realised_speedup": 1.2}
    assert deploy_speed.acceptance(row) == {
        "realised_at_least_0.9x_predicted": True,
        "not_slower_than_plain_onnx": True,
    }
    slow = {**row, "realised_over_predicted": 0.85, "exit_fractions": [0.3, 0.7]}
    assert deploy_speed.acceptance(slow) == {
        "realised_at_least_0.9x_predicted": False
    }  # few exit early: no speed check
    single = {"batch_size": 1, "router_pct": 1.5, "exit_fractions": [0.4, 0.6], "realised_speedup": 0.99}
    assert deploy_speed.acceptance(single) == {"router_at_most_1pct": False, "not_slower_than_plain_onnx": False}


def test_the_detach_ablation_pairs_seeds_and_tabulates_means() -> None:
    detached = [[0.50, 0.52, 0.54], [0.70, 0.70, 0.70]]  # budget x seed
    not_detached = [[0.49, 0.50, 0.51], [0.70, 0.70, 0.70]]
    d = policy_quality.detach_differences(detached, not_detached)
    assert d[0]["mean"] == pytest.approx(2.0) and d[0]["n"] == 3  # points: 1, 2, 3 per seed
    assert d[0]["ci_low"] == pytest.approx(2 - T_975[2] / math.sqrt(3))
    assert (d[1]["mean"], d[1]["ci_low"], d[1]["ci_high"]) == (0.0, 0.0, 0.0)
    result = {
        "budget_fractions": [0.4, 0.6],
        "detached_minus_not_points": d,
        "true": {"test_accuracy": detached, "test_cost_fraction": [[0.4, 0.4, 0.4], [0.6, 0.6, 0.6]]},
        "false": {"test_accuracy": not_detached, "test_cost_fraction": [[0.41, 0.41, 0.41], [0.6, 0.6, 0.6]]},
    }
    rows = policy_quality.detach_table(result).splitlines()[2:]
    assert (
        rows[0] == f"| 0.400 | 52.00 (0.400) | 50.00 (0.410) | +2.00 [{2 - T_975[2] / math.sqrt(3):+.2f}, "
        f"{2 + T_975[2] / math.sqrt(3):+.2f}] |"
    )
    assert rows[1] == "| 0.600 | 70.00 (0.600) | 70.00 (0.600) | +0.00 [+0.00, +0.00] |"


def test_step_overhead_pools_rounds_and_takes_the_median_window() -> None:
    def one_round(eenn: list[float], plain: list[float]) -> dict:
        timing = {"eenn": eenn, "plain_tuned": plain}
        return {"window_seconds": timing, "window_cpu_seconds": timing}

    # windows of 2 steps; eenn's overhead per window: 10 %, 20 %, 30 % (round 1), 40 %, 50 % (round 2)
    timing = step_overhead.pooled([one_round([1.1, 1.2, 1.3], [1.0, 1.0, 1.0]), one_round([2.8, 3.0], [2.0, 2.0])])
    assert timing["window_seconds"]["eenn"] == [1.1, 1.2, 1.3, 2.8, 3.0]
    o = step_overhead.overhead(timing, "window_cpu_seconds", window=2)
    assert o["overhead_pct_of_plain_step"] == pytest.approx(30.0)
    assert o["overhead_pct_per_window"] == pytest.approx([10.0, 20.0, 30.0, 40.0, 50.0])
    assert o["overhead_pct_ci95"] == pytest.approx([10.0, 50.0])  # 5 windows: the range
    assert o["overhead_us_per_step"] == pytest.approx(1e6 * 0.15)  # median of 0.05, 0.1, 0.15, 0.4, 0.5
    assert o["step_ms"] == pytest.approx({"eenn": 1e3 * 1.3 / 2, "plain_tuned": 1e3 * 1.0 / 2})
