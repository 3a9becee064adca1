"""Seeds as an axis of every comparison: the statistics are right on simulated studies with a known
gap, models are grouped by the config they share, and the report says "no detectable difference"
and "1 seed: no spread" where it should."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from eenn.evaluation.compare import Comparison, Model, group_seeds, seed_statistics, write_csv, write_group_csv
from eenn.evaluation.report import seed_table, write_report
from eenn.evaluation.stats import (
    NO_DIFFERENCE,
    NO_SPREAD,
    detectable_effect,
    median_interval,
    paired_difference,
    sign_flip_p,
    summarise,
    unpaired_difference,
)
from eenn.policies.synthetic import synthetic_predictions


def simulated_study(
    rng: np.random.Generator, n: int, gap: float, shared: float, own: float
) -> tuple[np.ndarray, np.ndarray]:
    """Two methods on n seeds: a per-seed component both share (the split, the order), their own
    noise, and a true gap between their means."""
    seed_effect = rng.normal(0, shared, n)
    a = 0.80 + gap + seed_effect + rng.normal(0, own, n)
    b = 0.80 + seed_effect + rng.normal(0, own, n)
    return a, b


def test_paired_intervals_cover_the_true_gap_95_percent_of_the_time():
    rng = np.random.default_rng(2026)
    gap = 0.01
    paired = unpaired = means = 0
    for _ in range(500):
        a, b = simulated_study(rng, 5, gap, shared=0.01, own=0.004)
        d = paired_difference(a, b)
        paired += d.ci_low <= gap <= d.ci_high
        u = unpaired_difference(a, b)
        unpaired += u.ci_low <= gap <= u.ci_high
        s = summarise(a)
        means += s.ci_low <= 0.80 + gap <= s.ci_high
    assert 0.93 <= paired / 500 <= 0.97
    assert 0.93 <= means / 500 <= 0.97
    assert unpaired / 500 >= 0.93  # Welch's interval is conservative here, never too narrow


def test_the_paired_interval_is_narrower_when_seeds_share_noise():
    rng = np.random.default_rng(7)
    widths = np.array(
        [
            [(d.ci_high - d.ci_low) for d in (paired_difference(a, b), unpaired_difference(a, b))]
            for a, b in (simulated_study(rng, 5, 0.01, shared=0.01, own=0.003) for _ in range(200))
        ]
    )
    assert (widths[:, 0] < widths[:, 1]).mean() > 0.95
    assert widths[:, 0].mean() < 0.5 * widths[:, 1].mean()


def test_known_values_of_the_tests():
    # five seeds, all better: the sign-flip test's smallest possible p, 2 / 2^5
    assert sign_flip_p([0.01, 0.02, 0.005, 0.01, 0.03]) == pytest.approx(2 / 32)
    assert sign_flip_p([0.01, -0.01]) == 1.0
    d = paired_difference([0.82, 0.85, 0.80], [0.80, 0.82, 0.79])
    # differences 0.02, 0.03, 0.01: mean 0.02, sd 0.01, t(0.975, 2) = 4.3027
    assert d.mean == pytest.approx(0.02) and d.n == 3 and d.paired
    assert d.ci_high - d.mean == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    assert d.p_t == pytest.approx(0.0742, abs=5e-4)  # t = 0.02 / (0.01 / sqrt 3) = 3.464, 2 degrees of freedom
    assert d.verdict == NO_DIFFERENCE and NO_DIFFERENCE in d.label
    assert detectable_effect(0.01, 3) == pytest.approx((4.302653 + 1.060660) * 0.01 / math.sqrt(3), rel=1e-5)
    assert paired_difference([0.9, 0.91, 0.92, 0.9], [0.8, 0.8, 0.81, 0.8]).verdict == "higher"


def test_the_median_interval_is_the_order_statistics_and_covers_95_percent():
    # n = 10: P(B <= 1) = 11/1024 <= 0.025 < P(B <= 2) = 56/1024, so x_(2) and x_(9)
    assert median_interval([10, 1, 9, 2, 8, 3, 7, 4, 6, 5]) == (5.5, 2.0, 9.0)
    assert median_interval([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)  # too few for 95 %: the range
    rng = np.random.default_rng(11)
    covered = sum(lo <= 1.0 <= hi for _, lo, hi in (median_interval(rng.lognormal(0, 1, 30)) for _ in range(500)))
    assert 0.93 <= covered / 500 <= 0.99  # skewed data, true median 1; the interval is conservative by design


def test_one_seed_is_labelled_as_having_no_spread():
    s = summarise([0.81])
    assert s.n == 1 and s.ci_low is None and NO_SPREAD in s.label
    d = paired_difference([0.82], [0.80])
    assert d.verdict == NO_SPREAD and NO_SPREAD in d.label and d.p_t is None


# ----------------------------------------------------------------------- groups in a comparison
def _model(name: str, training: str, seed: int, lr: float = 0.1) -> Model:
    preds = synthetic_predictions(200, seed=seed, split="test")
    config = {
        "seed": seed,
        "data.seed": seed,
        "training._target_": f"eenn.training.{training}",
        "training.optimizer.lr": lr,
        "paths.output_dir": f"/runs/{name}",
        "callbacks.model_checkpoint.dirpath": f"/runs/{name}/checkpoints",
    }
    return Model(name, Path(f"/runs/{name}"), training, preds, preds, config)


def _comparison(accuracies: dict[tuple[str, str, float], list[float]]) -> Comparison:
    """Models ``(training, lr)`` x seeds 0..n-1 with maxprob rows at budgets 0.5 and 0.8 of the
    given test accuracies (one list per budget, one value per seed)."""
    comp = Comparison()
    for (training, _, lr), values in accuracies.items():
        for seed, acc in enumerate(values):
            name = f"{training}_lr{lr}_s{seed}"
            comp.models[name] = _model(name, training, seed, lr)
            for fraction in (0.5, 0.8):
                comp.rows.append(
                    {
                        "model": name,
                        "training": training,
                        "policy": "maxprob",
                        "settings": "",
                        "requested_fraction": fraction,
                        "budget_fraction": fraction,
                        "budget": fraction,
                        "cost_unit": "flops",
                        "val_accuracy": acc,
                        "test_accuracy": acc + (fraction - 0.5) / 10,
                        "val_avg_cost": fraction,
                        "test_avg_cost": fraction,
                        "test_exit_fractions": json.dumps([0.5, 0.3, 0.2]),
                        "fit_seconds": 0.1,
                        "run": f"/fits/{name}_{fraction}",
                    }
                )
    group_seeds(comp)
    return comp


def test_models_that_differ_only_in_their_seed_form_one_group_named_by_what_differs():
    comp = _comparison(
        {
            ("joint", "", 0.1): [0.80, 0.81, 0.79],
            ("joint", "", 0.05): [0.8, 0.8, 0.8],
            ("bilevel", "", 0.1): [0.82, 0.83, 0.81],
        }
    )
    groups = {m.name: m.group for m in comp.models.values()}
    assert groups["joint_lr0.1_s0"] == groups["joint_lr0.1_s2"] == "joint (lr=0.1)"
    assert groups["joint_lr0.05_s1"] == "joint (lr=0.05)" and groups["bilevel_lr0.1_s0"] == "bilevel (lr=0.1)"
    assert {r["seed"] for r in comp.rows} == {0, 1, 2}


def test_the_report_marks_no_detectable_difference_and_single_seeds(tmp_path):
    comp = _comparison(
        {
            ("joint", "", 0.1): [0.800, 0.810, 0.790, 0.805, 0.795],
            ("bilevel", "", 0.1): [0.812, 0.808, 0.795, 0.800, 0.801],  # noise around joint
            ("soft", "", 0.1): [0.830, 0.840, 0.820, 0.835, 0.826],  # clearly better
            ("solo", "", 0.1): [0.9],
        }
    )  # one seed
    seed_statistics(comp, "joint")
    by = {(g.group, g.requested_fraction): g for g in comp.group_stats}
    assert by["bilevel", 0.5].difference.verdict == NO_DIFFERENCE
    assert by["soft", 0.5].difference.verdict == "higher"
    assert by["solo", 0.5].accuracy.n == 1
    header, rows = seed_table(comp)
    text = json.dumps(rows)
    assert NO_DIFFERENCE in text and NO_SPREAD in text and "could have seen" in text
    write_report(comp, [], tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert NO_DIFFERENCE in html and NO_SPREAD in html and "paired difference" in html
    write_csv(comp, tmp_path / "results.csv")
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    soft = [r for r in rows if r["group"] == "soft"]
    assert len(soft) == 10 and {r["verdict"] for r in soft} == {"higher"} and soft[0]["baseline"] == "joint"
    assert float(soft[0]["diff_ci_low"]) > 0 and soft[0]["group_n"] == "5"
    write_group_csv(comp, tmp_path / "groups.csv")
    groups = list(csv.DictReader(open(tmp_path / "groups.csv")))
    assert {(g["group"], g["verdict"]) for g in groups if g["requested_fraction"] == "0.5"} == {
        ("joint", ""),
        ("bilevel", NO_DIFFERENCE),
        ("soft", "higher"),
        ("solo", NO_SPREAD),
    }


def test_a_baseline_that_is_no_group_is_refused_naming_the_groups():
    from eenn.errors import EENNError

    comp = _comparison({("joint", "", 0.1): [0.8, 0.81]})
    with pytest.raises(EENNError, match=r"compare.baseline='bilevel' is neither a group nor a model.*joint"):
        seed_statistics(comp, "bilevel")
    seed_statistics(comp, "joint_lr0.1_s1")  # a model's name names its group
    assert comp.baseline == "joint"
