import pytest
import torch
from omegaconf import OmegaConf

from eenn.cost import CostProfile, profile_costs
from eenn.models import build_multi_exit
from tests.contracts import checks


def _net(depth, exits=None, head="conv_pool"):
    return build_multi_exit({"name": "cifar_resnet", "depth": depth}, exits or {"at": "stages", "head": {"name": head}},
                            num_classes=10, input_shape=(3, 32, 32))


@pytest.mark.parametrize("option, published_mmacs", [("resnet20", 41), ("resnet56", 125)])
def test_plain_cifar_resnet_macs_match_published_counts(option, published_mmacs):
    # He et al. 2016, built from conf/backbone/<option>.yaml as eenn-train composes it
    cfg = checks.compose_app("train", [f"backbone={option}", "exits=stages"])
    net = build_multi_exit(OmegaConf.to_container(cfg.backbone), OmegaConf.to_container(cfg.exits), 10, (3, 32, 32))
    costs = profile_costs(net, (3, 32, 32), latency=False)
    assert costs.backbone["macs"] / 1e6 == pytest.approx(published_mmacs, rel=0.03)
    assert costs.backbone["flops"] == 2 * costs.backbone["macs"]


def test_costs_accumulate_stages_and_every_earlier_head():
    net = _net(20, {"spacing": "even", "first": 2, "count": 3, "head": {"name": "conv_stack", "depth": 2}})
    costs = profile_costs(net, (3, 32, 32), latency=True, latency_batch_size=2, repeats=2, warmup=1)
    for unit in ("flops", "macs", "params", "latency_ms"):
        vals = costs.per_exit(unit)
        assert all(b > a for a, b in zip(vals, vals[1:])), (unit, vals)
    heads = costs.per_head("flops")
    assert all(h > 0 for h in heads)
    # the last exit = the plain backbone + every earlier head's overhead, exactly
    assert costs.exits[-1].flops == costs.backbone["flops"] + sum(heads[:-1])
    assert costs.exits[-1].params == costs.backbone["params"] + sum(costs.per_head("params")[:-1])
    assert costs.exits[-1].latency_ms == pytest.approx(costs.backbone["latency_ms"] + sum(costs.per_head("latency_ms")[:-1]))


def test_profile_round_trips_through_dict_and_prints_a_table():
    costs = profile_costs(_net(20), (3, 32, 32), latency=False)
    again = CostProfile.from_dict(costs.to_dict())
    assert again == costs
    text = costs.format()
    assert "backbone (no exits)" in text and "layer1.2" in text


def test_profiling_leaves_the_network_mode_and_weights_alone():
    net = _net(20)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    profile_costs(net, (3, 32, 32), latency=True, repeats=1, warmup=0)
    assert net.training
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])
