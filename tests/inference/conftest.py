"""A small multi-exit network (briefly trained, so that its exits agree on some samples and
disagree on others), its cost profile and validation/test logits."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from eenn.cost import CostProfile, profile_costs
from eenn.models import build_multi_exit
from eenn.models.multi_exit import MultiExitNetwork
from eenn.predictions import Predictions

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
    return Predictions(
        logits,
        labels,
        torch.tensor(profile.per_exit("flops")),
        split=split,
        head_costs=torch.tensor(profile.per_head("flops")),
        cost_table={"macs": torch.tensor(profile.per_exit("macs"))},
        head_cost_table={"macs": torch.tensor(profile.per_head("macs"))},
    )


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """One intra-op thread for this package's tests, restored after them: these networks are tiny,
    and on a 2-core machine with a core busy elsewhere every two-thread op waits for the
    descheduled thread (tens of times slower). Tests of threading set their own count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def briefly_trained(net: MultiExitNetwork, steps: int = 20) -> MultiExitNetwork:
    """A few Adam steps on every exit towards a fixed random function of the input: untrained
    heads each predict one same class for almost every sample, so no two exits ever agree and
    agreement-based policies (patience) would send everyone to the last exit."""
    teacher = torch.randn(4 * SHAPE[0], 10)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(steps):
        x = torch.randn(32, *SHAPE)
        y = (torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1) @ teacher).argmax(-1)
        loss = sum(torch.nn.functional.cross_entropy(logits, y) for logits in net(x).unbind(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="package")
def setup(one_thread) -> Setup:
    torch.manual_seed(0)
    net = briefly_trained(
        build_multi_exit(
            {"name": "cifar_resnet", "depth": 20},
            {"at": "stages", "head": {"name": "conv_pool"}},
            num_classes=10,
            input_shape=SHAPE,
        )
    )
    profile = profile_costs(net, SHAPE, latency=False)
    xv, xt = torch.randn(300, *SHAPE), torch.randn(200, *SHAPE)
    return Setup(net, profile, predictions(net, profile, xv, "val"), xt, predictions(net, profile, xt, "test"))
