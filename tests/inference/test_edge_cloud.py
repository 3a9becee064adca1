"""Edge/cloud partition: per-sample times by hand, and DEEx's Fig. 4 reproduced qualitatively."""

from __future__ import annotations

import itertools

import pytest
import torch

from eenn.errors import EENNError
from eenn.inference.edge_cloud import (
    Link,
    Partition,
    edge_cloud_report,
    measure_partition,
    p_d_time_curve,
    sample_times,
)
from eenn.policies import build_policy
from eenn.policies.simulate import simulate
from eenn.policies.synthetic import synthetic_predictions

STAGE, HEAD = [2.0, 1.0, 1.5], [0.2, 0.3, 0.01]


def _partition(split=1, bandwidth=8.0, rtt=5.0, speedup=1.0):
    return Partition(split, STAGE, HEAD, [3000, 4000, 2000, 1000], Link(bandwidth, rtt), speedup)


def test_per_sample_times_split_edge_transfer_and_cloud():
    p = _partition(split=0, speedup=2.0)
    exit_index = torch.tensor([0, 2, 1])
    heads = torch.tensor([[1, 0, 0], [1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    t = sample_times(p, exit_index, heads)
    link = 5.0 + 4000 * 8 / 8e6 * 1e3  # rtt + stage 0's activation over 8 Mbit/s = 9 ms
    assert t["edge_ms"].tolist() == pytest.approx([2.2, 2.2, 2.2])
    assert t["transfer_ms"].tolist() == pytest.approx([0.0, link, link])
    assert t["cloud_ms"].tolist() == pytest.approx([0.0, (1.0 + 1.5 + 0.01) / 2, (1.0 + 0.3) / 2])
    assert t["offloaded"].tolist() == [False, True, True]
    report = edge_cloud_report(p, exit_index, heads, torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3]))
    assert report["offload_ratio"] == pytest.approx(2 / 3) and report["bytes_sent"] == 8000
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert report["total_time_s"] == pytest.approx(float(t["total_ms"].sum()) / 1e3)


def test_inference_time_grows_with_p_d_from_all_at_exit_2_to_all_at_the_backbone():
    """DEEx Fig. 4: p_d = 0 keeps every sample at the edge's EE 2, p_d = 1 offloads all to exit 3."""
    preds = synthetic_predictions(500, num_exits=3, seed=1, split="test")
    for p in (_partition(rtt=0.0, bandwidth=1e9), _partition()):  # without and with a communication delay
        curve = p_d_time_curve(p, preds, torch.linspace(0, 1, 21).tolist(), build_policy("deex", p_tar=0.9))
        times = [c["total_time_s"] for c in curve]
        assert all(b >= a for a, b in itertools.pairwise(times))
        assert times[-1] > times[0]
        assert curve[0]["exit_fractions"] == [0.0, 1.0, 0.0] and curve[0]["offload_ratio"] == 0.0
        assert curve[-1]["exit_fractions"] == [0.0, 0.0, 1.0] and curve[-1]["offload_ratio"] == 1.0
        assert 0.0 < curve[10]["offload_ratio"] < 1.0
        n = preds.num_samples
        # the end points: everyone answering at EE 2 on the edge (as the static policy at exit 1) ...
        static = build_policy("static", exit=1).fit(preds, None, "flops")
        at_ee2 = edge_cloud_report(p, *simulate(static, preds.logits))
        assert times[0] == pytest.approx(at_ee2["total_time_s"])
        assert times[0] == pytest.approx(n * (2.0 + 1.0 + 0.2 + 0.3) / 1e3)
        # ... and everyone offloaded: heads 0 and 2 only, the edge's two stages, the link, the cloud's stage
        assert times[-1] == pytest.approx(n * (2.0 + 1.0 + 0.2 + p.link.transfer_ms(2000) + 1.5 + 0.01) / 1e3)
        acc = preds.accuracy_per_exit()
        assert curve[0]["accuracy"] == pytest.approx(float(acc[1])) and curve[-1]["accuracy"] == pytest.approx(
            float(acc[2])
        )


def test_a_faster_cloud_and_no_delay_can_make_offloading_pay():
    preds = synthetic_predictions(200, num_exits=3, seed=2)
    curve = p_d_time_curve(_partition(rtt=0.0, bandwidth=1e9, speedup=10.0), preds, [0.0, 1.0], build_policy("deex"))
    assert curve[1]["total_time_s"] < curve[0]["total_time_s"]


def test_measured_partition_sizes_the_activation_that_crosses_the_link(setup):
    net = setup.network
    p = measure_partition(net, (3, 16, 16), split=0, link=Link(10.0, 1.0), repeats=2)
    with torch.inference_mode():
        h0 = net.forward_stage(0, torch.zeros(1, 3, 16, 16))
    assert p.activation_bytes[0] == 3 * 16 * 16 * 4 and p.sent_bytes == h0.numel() * 4
    assert len(p.stage_ms) == 3 and all(t > 0 for t in p.stage_ms + p.head_ms)
    with pytest.raises(EENNError, match="edge_cloud.split=3"):
        Partition(3, STAGE, HEAD, [1, 1, 1, 1], Link(1.0, 0.0))
