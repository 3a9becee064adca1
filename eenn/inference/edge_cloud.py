"""Edge/cloud partitioning (DEEx sec. III): simulated per-sample inference time.

The network is split after stage ``split``: the edge device runs stages 0..split and their exits,
the cloud the rest. A sample answering at an exit k <= split never leaves the edge; any other is
offloaded: the edge runs stages 0..split (and the heads it evaluates there), sends stage
``split``'s activation over a link (one round trip plus its bytes over the bandwidth), and the
cloud runs stages split+1..k and the heads it evaluates there, ``cloud_speedup`` times faster.
DEEx's own partition is split = K-2: the early exits on the edge, the backbone's last stage and
classifier in the cloud; split = -1 sends the raw input (cloud only).

Times come from per-stage and per-head latencies measured on this machine (standing in for the
edge device); which exits each sample evaluates comes from an engine run or from offline
simulation, so any policy works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from eenn.cost import stage_latencies
from eenn.errors import EENNError
from eenn.inference.report import latency_stats
from eenn.models.multi_exit import MultiExitNetwork
from eenn.policies import ExitPolicy, build_policy
from eenn.policies.simulate import simulate
from eenn.predictions import Predictions


@dataclass
class Link:
    bandwidth_mbps: float  # megabits per second, uplink
    rtt_ms: float  # round trip: request out, answer back

    def transfer_ms(self, nbytes: float) -> float:
        return self.rtt_ms + nbytes * 8.0 / (self.bandwidth_mbps * 1e6) * 1e3


@dataclass
class Partition:
    """Where the network is cut and what each part costs per sample."""

    split: int  # the edge runs stages 0..split; -1: nothing on the edge
    stage_ms: list[float]  # per sample, on the edge device
    head_ms: list[float]
    activation_bytes: list[int]  # per sample, what crosses the link when cutting after stage s (index s+1)
    link: Link
    cloud_speedup: float = 1.0

    def __post_init__(self) -> None:
        K = len(self.stage_ms)
        if not -1 <= self.split < K:
            raise EENNError(f"edge_cloud.split={self.split} must lie in -1..{K - 1} (the stage after which to cut).")
        if not self.cloud_speedup > 0:
            raise EENNError(f"edge_cloud.cloud_speedup must be > 0, got {self.cloud_speedup!r}.")
        if not self.link.bandwidth_mbps > 0:
            raise EENNError(f"edge_cloud.bandwidth_mbps must be > 0, got {self.link.bandwidth_mbps!r}.")
        if not self.link.rtt_ms >= 0:
            raise EENNError(f"edge_cloud.rtt_ms must be >= 0, got {self.link.rtt_ms!r}.")

    @property
    def sent_bytes(self) -> int:
        return self.activation_bytes[self.split + 1]


def measure_partition(
    network: MultiExitNetwork,
    input_shape: Sequence[int],
    split: int,
    link: Link,
    cloud_speedup: float = 1.0,
    batch_size: int = 1,
    bytes_per_element: int = 4,
    repeats: int = 10,
) -> Partition:
    """Measure per-sample stage/head latencies at ``batch_size`` (1: request by request, as an edge
    device serves) and the size of every cut's activation (``bytes_per_element``: 4 for float32)."""
    device = next(network.parameters()).device
    was_training = network.training
    network.eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    stage_ms, head_ms = stage_latencies(network, x, repeats=repeats)
    sizes = [int(x[0].numel()) * bytes_per_element]
    with torch.inference_mode():
        h = x[:1]
        for k in range(network.num_exits):
            h = network.forward_stage(k, h)
            maps = [h] if isinstance(h, torch.Tensor) else h  # MSDNet stages hand on every scale
            sizes.append(sum(int(t[0].numel()) for t in maps) * bytes_per_element)
    network.train(was_training)
    return Partition(
        split, [t / batch_size for t in stage_ms], [t / batch_size for t in head_ms], sizes, link, cloud_speedup
    )


def sample_times(p: Partition, exit_index: torch.Tensor, heads_evaluated: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample edge, transfer and cloud milliseconds (N,) float64, and who was offloaded."""
    K = len(p.stage_ms)
    stage = torch.tensor(p.stage_ms, dtype=torch.float64)
    head = torch.tensor(p.head_ms, dtype=torch.float64)
    ks = torch.arange(K)
    upto = (ks[None, :] <= exit_index[:, None]).double()  # stages each sample runs
    on_edge = (ks <= p.split).double()
    edge = upto @ (stage * on_edge) + heads_evaluated.double() @ (head * on_edge)
    cloud = (upto @ (stage * (1 - on_edge)) + heads_evaluated.double() @ (head * (1 - on_edge))) / p.cloud_speedup
    offloaded = exit_index > p.split
    transfer = offloaded.double() * p.link.transfer_ms(p.sent_bytes)
    return {
        "edge_ms": edge,
        "transfer_ms": transfer,
        "cloud_ms": cloud,
        "total_ms": edge + transfer + cloud,
        "offloaded": offloaded,
    }


def edge_cloud_report(
    p: Partition,
    exit_index: torch.Tensor,
    heads_evaluated: torch.Tensor,
    predictions: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Per-sample time statistics, offload ratio, bytes sent and (with labels) accuracy."""
    t = sample_times(p, exit_index, heads_evaluated)
    off = t["offloaded"]
    n_off = int(off.sum())
    K = heads_evaluated.shape[1]
    out: dict[str, Any] = {
        "partition": {**asdict(p), "sent_bytes_per_offload": p.sent_bytes},
        "num_samples": int(exit_index.numel()),
        "time_ms": latency_stats(t["total_ms"]),
        "total_time_s": float(t["total_ms"].sum()) / 1e3,
        "edge_ms_mean": float(t["edge_ms"].mean()),
        "transfer_ms_mean": float(t["transfer_ms"].mean()),
        "cloud_ms_mean": float(t["cloud_ms"].mean()),
        "offload_ratio": n_off / exit_index.numel(),
        "bytes_sent": n_off * p.sent_bytes,
        "exit_fractions": (torch.bincount(exit_index, minlength=K).double() / exit_index.numel()).tolist(),
        "accuracy": None,
    }
    if predictions is not None and labels is not None:
        out["accuracy"] = float((predictions == labels).double().mean())
    return out


def p_d_time_curve(p: Partition, preds: Predictions, p_ds: Sequence[float], policy: ExitPolicy) -> list[dict[str, Any]]:
    """DEEx's Fig. 4 (with Fig. 3's exit fractions and Fig. 5's accuracy) for a policy whose
    decision threshold p_d trades edge for cloud (``has_p_d_curve``): for each p_d, the time to
    infer the whole set, the offload ratio and the accuracy, from saved predictions (offline: the
    logits do not depend on p_d, only the exits taken do)."""
    n = preds.num_samples
    curve = []
    for p_d in p_ds:
        variant = build_policy(policy.name, **{**policy.hparams(), "p_d": float(p_d)}).fit(preds, None, preds.cost_unit)
        exit_index, heads = simulate(variant, preds.logits)
        pred = preds.logits[torch.arange(n), exit_index].argmax(-1)
        row = edge_cloud_report(p, exit_index, heads, pred, preds.labels)
        curve.append(
            {
                "p_d": float(p_d),
                **{
                    k: row[k]
                    for k in ("total_time_s", "time_ms", "offload_ratio", "bytes_sent", "exit_fractions", "accuracy")
                },
            }
        )
    return curve
