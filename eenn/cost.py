"""Cost profile of a multi-exit network: what a sample pays to get its answer at exit k.

Exit k's cost is the backbone up to stage k plus every exit head up to k (the sample evaluated the
earlier heads too: MSDNet's and Distiller's accounting), so costs strictly increase with k and the
last exit costs the plain backbone plus the early heads' overhead. FLOPs come from
``torch.utils.flop_counter`` (2 FLOPs per multiply-accumulate of convolutions and matmuls, and of
attention's two matmuls);
latency is measured on the current device, since FLOPs are a poor proxy for CPU time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from eenn.models.multi_exit import Features, MultiExitNetwork


@dataclass
class ExitCost:
    name: str
    flops: int  # cumulative: stages 0..k + heads 0..k
    macs: int
    params: int
    latency_ms: float | None
    head_flops: int  # this exit head's own overhead
    head_macs: int
    head_params: int
    head_latency_ms: float | None


@dataclass
class CostProfile:
    exits: list[ExitCost]
    backbone: dict[str, Any]  # the plain backbone (no early heads): flops, macs, params, latency_ms
    input_shape: list[int]
    latency_batch_size: int | None = None
    device: str = "cpu"
    units: list[str] = field(default_factory=lambda: ["flops", "macs", "params", "latency_ms"])

    def per_exit(self, unit: str) -> list[float]:
        return [float(getattr(e, unit)) for e in self.exits]

    def per_head(self, unit: str) -> list[float]:
        return [float(getattr(e, f"head_{unit}")) for e in self.exits]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostProfile:
        d = dict(d)
        d["exits"] = [ExitCost(**e) for e in d["exits"]]
        return cls(**d)

    def table(self) -> list[list[Any]]:
        """Rows for printing / wandb: per exit, cumulative and head-only costs."""
        full = self.backbone["flops"]
        rows = []
        for e in self.exits:
            lat = "-" if e.latency_ms is None else f"{e.latency_ms:.3f}"
            rows.append(
                [
                    e.name,
                    f"{e.macs / 1e6:.2f}",
                    f"{e.flops / full:.3f}",
                    f"{e.params / 1e6:.3f}",
                    f"{e.head_macs / 1e6:.3f}",
                    lat,
                ]
            )
        lat = self.backbone.get("latency_ms")
        rows.append(
            [
                "backbone (no exits)",
                f"{self.backbone['macs'] / 1e6:.2f}",
                "1.000",
                f"{self.backbone['params'] / 1e6:.3f}",
                "-",
                "-" if lat is None else f"{lat:.3f}",
            ]
        )
        return rows

    table_columns = ["exit", "MMACs (cumulative)", "x backbone FLOPs", "Mparams", "head MMACs", "latency ms"]

    def format(self) -> str:
        rows = [self.table_columns, *self.table()]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows)


# torch's counter knows the CUDA kernels of scaled_dot_product_attention but not the CPU one, which
# it would count as 0: count it as torch counts the others (QK^T and AV).
def _cpu_attention_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def _flops(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
        y = module(x)
    return int(counter.get_total_flops()), y


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _median_ms(fn, x: Features, warmup: int, repeats: int) -> float:
    first = x if isinstance(x, torch.Tensor) else x[0]  # MSDNet's stages hand on every scale
    sync = torch.cuda.synchronize if first.is_cuda else (lambda: None)
    for _ in range(warmup):
        fn(x)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def stage_latencies(
    network: MultiExitNetwork, x: torch.Tensor, warmup: int = 3, repeats: int = 10
) -> tuple[list[float], list[float]]:
    """Median milliseconds of each stage and each head on batch ``x`` (per batch, not per sample)."""
    stage_ms, head_ms = [], []
    with torch.inference_mode():
        for k in range(network.num_exits):
            stage_ms.append(_median_ms(network.stages[k], x, warmup, repeats))
            x = network.forward_stage(k, x)
            head_ms.append(_median_ms(network.heads[k], x, warmup, repeats))
    return stage_ms, head_ms


def profile_costs(
    network: MultiExitNetwork,
    input_shape: Sequence[int],
    latency: bool = True,
    latency_batch_size: int = 1,
    warmup: int = 3,
    repeats: int = 10,
    device: torch.device | str | None = None,
) -> CostProfile:
    """Count FLOPs/MACs/params per exit (batch of one) and, if ``latency``, measure per-exit latency."""
    was_training = network.training
    network.eval()
    device = torch.device(device) if device is not None else next(network.parameters()).device
    stage_flops, head_flops, stage_params, head_params = [], [], [], []
    with torch.no_grad():
        x = torch.zeros(1, *input_shape, device=device)
        for k in range(network.num_exits):
            f, x = _flops(network.stages[k], x)
            stage_flops.append(f)
            stage_params.append(_params(network.stages[k]))
            f, _ = _flops(network.heads[k], x)
            head_flops.append(f)
            head_params.append(_params(network.heads[k]))
    stage_ms = head_ms = None
    if latency:
        xb = torch.randn(latency_batch_size, *input_shape, device=device)
        stage_ms, head_ms = stage_latencies(network, xb, warmup, repeats)
        stage_ms = [t / latency_batch_size for t in stage_ms]
        head_ms = [t / latency_batch_size for t in head_ms]
    network.train(was_training)

    exits, cum = [], {"flops": 0, "params": 0, "ms": 0.0}
    for k, name in enumerate(network.exit_names):
        cum["flops"] += stage_flops[k] + head_flops[k]
        cum["params"] += stage_params[k] + head_params[k]
        if latency:
            cum["ms"] += stage_ms[k] + head_ms[k]
        exits.append(
            ExitCost(
                name=name,
                flops=cum["flops"],
                macs=cum["flops"] // 2,
                params=cum["params"],
                latency_ms=cum["ms"] if latency else None,
                head_flops=head_flops[k],
                head_macs=head_flops[k] // 2,
                head_params=head_params[k],
                head_latency_ms=head_ms[k] if latency else None,
            )
        )
    last = network.num_exits - 1
    backbone_flops = sum(stage_flops) + head_flops[last]
    backbone = {
        "flops": backbone_flops,
        "macs": backbone_flops // 2,
        "params": sum(stage_params) + head_params[last],
        "latency_ms": (sum(stage_ms) + head_ms[last]) if latency else None,
    }
    return CostProfile(
        exits=exits,
        backbone=backbone,
        input_shape=list(input_shape),
        latency_batch_size=latency_batch_size if latency else None,
        device=str(device),
    )
