"""A small random-weight multi-exit network, its cost profile and validation/test logits."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from eenn.cost import CostProfile, profile_costs
from eenn.evaluation.predictions import Predictions
from eenn.models import build_multi_exit
from eenn.models.multi_exit import MultiExitNetwork

SHAPE = (3, 16, 16)


@dataclass
class Setup:
    network: MultiExitNetwork
    profile: CostProfile
    val: Predictions
    x: torch.Tensor  # test inputs
    test: Predictions  # the network's logits on x, from one full forward


def predictions(network: MultiExitNetwork, profile: CostProfile, x: torch.Tensor, split: str) -> Predictions:
    with torch.inference_mode():
        logits = network(x)
    # labels: the last exit's prediction, flipped for a third of samples, so accuracies differ by exit
    labels = logits[:, -1].argmax(-1)
    labels[::3] = (labels[::3] + 1) % logits.shape[-1]
    return Predictions(logits, labels, torch.tensor(profile.per_exit("flops")), split=split,
                       head_costs=torch.tensor(profile.per_head("flops")),
                       cost_table={"macs": torch.tensor(profile.per_exit("macs"))},
                       head_cost_table={"macs": torch.tensor(profile.per_head("macs"))})


@pytest.fixture(scope="session")
def setup() -> Setup:
    torch.manual_seed(0)
    net = build_multi_exit({"family": "cifar_resnet", "depth": 20}, {"at": "stages", "head": {"type": "conv_pool"}},
                           num_classes=10, input_shape=SHAPE).eval()
    profile = profile_costs(net, SHAPE, latency=False)
    xv, xt = torch.randn(300, *SHAPE), torch.randn(200, *SHAPE)
    return Setup(net, profile, predictions(net, profile, xv, "val"), xt, predictions(net, profile, xt, "test"))
