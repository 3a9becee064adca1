import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from eenn.cost import ATTENTION_FLOPS, CostProfile, profile_costs
from eenn.models import build_multi_exit
from tests.contracts import checks


def _net(depth, exits=None, head="conv_pool"):
    return build_multi_exit(
        {"name": "cifar_resnet", "depth": depth},
        exits or {"at": "stages", "head": {"name": head}},
        num_classes=10,
        input_shape=(3, 32, 32),
    )


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
    assert costs.exits[-1].latency_ms == pytest.approx(
        costs.backbone["latency_ms"] + sum(costs.per_head("latency_ms")[:-1])
    )


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


def test_attention_flops_are_counted_on_cpu():
    # torch's counter registers only the CUDA kernels of scaled_dot_product_attention; on CPU it runs
    # _scaled_dot_product_flash_attention_for_cpu, which eenn counts as its two matmuls, QK^T and AV
    q, k, v = torch.randn(2, 3, 65, 64), torch.randn(2, 3, 65, 64), torch.randn(2, 3, 65, 64)
    with FlopCounterMode(display=False) as matmuls:
        (q @ k.transpose(-2, -1)).softmax(-1) @ v
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as sdpa:
        F.scaled_dot_product_attention(q, k, v)
    assert sdpa.get_total_flops() == matmuls.get_total_flops() == 2 * 2 * (2 * 3 * 65 * 65 * 64)


def test_a_vit_costs_its_blocks_attention_included_and_has_a_latency_per_block():
    # DeiT-tiny's blocks at 32 px with 4-px patches: N = 65 tokens of width D = 192; a block's
    # multiply-adds are 12 N D^2 (qkv, projection, MLP) + 2 N^2 D (QK^T and AV)
    net = build_multi_exit(
        {"name": "deit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 4},
        {"at": "stages"},
        num_classes=10,
        input_shape=(3, 32, 32),
    )
    costs = profile_costs(net, (3, 32, 32), latency=True, repeats=2, warmup=1)
    assert [e.name for e in costs.exits] == ["blocks.0", "blocks.1", "blocks.2", "final"]
    n, d = 65, 192
    for k in (1, 2):
        block = costs.exits[k].macs - costs.exits[k - 1].macs - costs.exits[k].head_macs
        assert block == 12 * n * d * d + 2 * n * n * d
    latencies = costs.per_exit("latency_ms")  # one per block: an exit after every block
    assert all(b > a for a, b in zip(latencies, latencies[1:]))
