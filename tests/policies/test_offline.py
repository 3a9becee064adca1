"""Offline evaluation: the metrics dict on hand-built predictions, realised costs, and speed."""

from __future__ import annotations

import pytest
import torch

from eenn import predictions as predictions_module
from eenn.evaluation.offline import evaluate
from eenn.policies import build_policy
from eenn.policies.simulate import realised_cost, simulate

from .helpers import EENET_FAST, logits_for_max_prob, predictions


def test_metrics_on_hand_built_predictions() -> None:
    # 4 samples, 3 exits; maxprob thresholds 0.85 / 0.85: confidences decide the exits
    conf = [[0.9, 0.9, 0.9], [0.6, 0.9, 0.9], [0.6, 0.6, 0.6], [0.95, 0.6, 0.6]]
    pred = [[0, 0, 0], [1, 1, 1], [0, 1, 1], [1, 1, 1]]
    logits = torch.stack([logits_for_max_prob(c, p) for c, p in zip(conf, pred)])
    preds = predictions(logits, [0, 1, 1, 0], [1.0, 2.0, 4.0], [0.5, 0.5, 0.0])
    policy = build_policy("maxprob", thresholds=[0.85, 0.85]).fit(preds, None, "flops")
    S = evaluate(policy, preds, "flops")
    # exits: 0, 1, 2, 0; predicted 0, 1, 1, 1 -> right, right, right, wrong
    assert S["exit_fractions"] == [0.5, 0.25, 0.25]
    assert S["exit_accuracy"] == [0.5, 1.0, 1.0]
    assert S["accuracy"] == 0.75
    assert S["avg_cost"] == pytest.approx((1 + 2 + 4 + 1) / 4)
    assert S["avg_cost_fraction"] == pytest.approx(2 / 4)
    assert S["confusion"] == [[1, 1], [0, 2]]  # rows: true class, columns: predicted
    assert S["num_samples"] == 4
    static = evaluate(build_policy("static", exit=0).fit(preds, None, "flops"), preds, "flops")
    assert static["exit_accuracy"] == [0.5, None, None]  # nobody exits at 1, 2


def test_realised_cost_charges_only_the_heads_evaluated() -> None:
    costs = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)  # cumulative, heads included
    heads = torch.tensor([0.25, 0.5, 0.0], dtype=torch.float64)
    exit_idx = torch.tensor([0, 2, 2])
    evaluated = torch.tensor([[True, False, False], [True, True, True], [True, False, True]])
    assert realised_cost(exit_idx, evaluated, costs, heads).tolist() == [1.0, 4.0, 3.5]


def test_cost_units_come_from_the_cost_table(val) -> None:
    policy = build_policy("maxprob").fit(val, 0.5 * float(val.costs_in("latency_ms")[-1]), "latency_ms")
    S = evaluate(policy, val, "latency_ms")
    assert S["avg_cost"] <= policy.budget * (1 + 1e-9)
    assert S["avg_cost_fraction"] == pytest.approx(0.5, abs=0.01)


def test_simulate_reports_every_head_a_sample_evaluated(val) -> None:
    policy = build_policy("maxprob").fit(val, 0.6 * float(val.costs[-1]), "flops")
    exit_idx, heads = simulate(policy, val.logits, val.labels)
    upto = torch.arange(val.num_exits)[None, :] <= exit_idx[:, None]
    assert torch.equal(heads, upto)  # threshold policies look at every head up to their exit


#: settings that fit within the budget below (risk: an epsilon whose certified threshold costs < 0.6)
OPTIONS = {"eenet": EENET_FAST, "risk": {"epsilon": 0.1}}


@pytest.mark.parametrize("name", ["maxprob", "patience", "deex", "eenet", "oracle_budget", "risk"])
def test_row_blocks_change_no_decision(name: str, val, monkeypatch) -> None:
    # fitting and simulation go over large files in row blocks; blocks of 400 rows here must give
    # what one block of all 1,500 gives (oracle_budget's assignment spans every sample; risk's
    # candidate losses are summed over the blocks)
    whole = build_policy(name, **OPTIONS.get(name, {}))
    whole.fit(val, max(0.6 * float(val.costs[-1]), whole.cheapest_cost(val, "flops")), "flops")
    expected = simulate(whole, val.logits, val.labels)
    monkeypatch.setattr(predictions_module, "BLOCK_BYTES", 400 * val.logits[0].numel() * 4)
    blocked = build_policy(name, **OPTIONS.get(name, {}))
    blocked.fit(val, whole.budget, "flops")
    assert blocked.info == whole.info
    for got, want in zip(simulate(blocked, val.logits, val.labels), expected):
        assert torch.equal(got, want)
