"""Run a trained network over the held-out splits and keep every exit's logits."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from eenn.cost import CostProfile
from eenn.models.multi_exit import MultiExitNetwork
from eenn.predictions import Predictions


@torch.inference_mode()
def collect_logits(
    network: MultiExitNetwork, loader: DataLoader, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = network.training
    network.eval()
    logits, labels = [], []
    for x, y in loader:
        logits.append(network(x.to(device)).float().cpu())
        labels.append(y)
    network.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def make_predictions(
    network: MultiExitNetwork,
    loader: DataLoader,
    costs: CostProfile,
    class_names: list[str],
    split: str,
    source_run: str,
    device: torch.device,
) -> Predictions:
    """Predictions in FLOPs, with MACs, params and (if measured) latency as extra cost units."""
    logits, labels = collect_logits(network, loader, device)
    units = ["macs", "params"] + (["latency_ms"] if costs.exits[0].latency_ms is not None else [])
    return Predictions(
        logits=logits,
        labels=labels,
        costs=torch.tensor(costs.per_exit("flops")),
        head_costs=torch.tensor(costs.per_head("flops")),
        cost_unit="flops",
        exit_names=list(network.exit_names),
        class_names=list(class_names),
        split=split,
        source_run=source_run,
        cost_table={u: torch.tensor(costs.per_exit(u)) for u in units},
        head_cost_table={u: torch.tensor(costs.per_head(u)) for u in units},
    )
