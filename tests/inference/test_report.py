"""The Distiller-style cost table adds up, and reproduces the article's ResNet-50 numbers."""

from __future__ import annotations

import pytest
import torch

from eenn.cost import CostProfile, ExitCost
from eenn.inference.report import cost_report, format_report
from eenn.policies import build_policy
from eenn.policies.simulate import simulate

# Distiller article, Figure 4: ResNet-50 on ImageNet with 2 early exits
STANDARD = 3_486_721_024
THROUGH = [454_045_522, 1_605_587_538, 3_603_185_234]
HEADS = [104_820_562, 11_643_648, 2_049_000]


def _distiller_profile() -> CostProfile:
    exits = [
        ExitCost(name, 2 * m, m, 0, None, 2 * h, h, 0, None)
        for name, m, h in zip(["exit0", "exit1", "final"], THROUGH, HEADS)
    ]
    return CostProfile(exits, {"flops": 2 * STANDARD, "macs": STANDARD, "params": 0, "latency_ms": None}, [3, 224, 224])


def test_the_article_table_is_reproduced():
    counts = [2272, 2372, 5356]  # 22.72%, 23.72%, 53.56% of 10,000
    exit_index = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    heads = torch.arange(3)[None, :] <= exit_index[:, None]
    r = cost_report(_distiller_profile(), exit_index, heads, "macs")
    assert r["overhead_total"] == 116_464_210
    assert [e["savings_after"] for e in r["exits"]] == [3_137_496_064, 1_997_597_696, 0.0]
    assert [e["through"] for e in r["exits"]] == THROUGH
    assert r["worst_case"] == 3_603_185_234 and r["standard"] == STANDARD
    assert r["total_exit_early"] == pytest.approx(0.4644)
    assert r["average"] == pytest.approx(2_413_744_552, rel=1e-4)  # the article rounds its percentages
    assert round(100 * r["savings_per_input"], 2) == 30.77
    assert round(r["speedup"], 2) == 1.44
    text = format_report({"expected": r, "realised": r})
    assert "Average MACs/input" in text and "2,413,870,518" in text and "30.77%" in text


@pytest.mark.parametrize("policy, hparams, budget", [("maxprob", {}, 0.6), ("deex", {"p_tar": 0.12}, 0.8)])
def test_numbers_add_up(setup, policy, hparams, budget):
    p = build_policy(policy, **hparams).fit(setup.val, budget * setup.profile.exits[-1].flops, "flops")
    exit_index, heads = simulate(p, setup.test.logits)
    for unit in ("macs", "flops"):
        r = cost_report(setup.profile, exit_index, heads, unit)
        fractions = [e["fraction"] for e in r["exits"]]
        assert sum(fractions) == pytest.approx(1.0)
        assert r["total_exit_early"] == pytest.approx(sum(fractions[:-1]))
        assert r["average"] == pytest.approx(sum(f * (e["avg_cost"] or 0.0) for f, e in zip(fractions, r["exits"])))
        assert r["average"] == pytest.approx(sum(e["contribution"] for e in r["exits"]))
        assert r["speedup"] == pytest.approx(r["standard"] / r["average"])
        assert r["savings_per_input"] == pytest.approx(1 - r["average"] / r["standard"])
        assert r["worst_case"] == pytest.approx(r["standard"] + r["overhead_total"])
        if policy == "maxprob":  # nobody skips a head: each exit's samples pay exactly its "through" cost
            assert r["average"] == pytest.approx(sum(f * e["through"] for f, e in zip(fractions, r["exits"])))
