"""DenseNet-BC (Huang et al. 2017) as EENet uses it (git-disl/EENet ``models/densenet.py``).

DenseNet-121 is four dense blocks of [6, 12, 24, 16] bottleneck layers (BN-ReLU-1x1 conv to
4k channels, BN-ReLU-3x3 conv to k, concatenated to the input), with a transition (BN-ReLU-1x1 conv
halving the channels, 2x2 average pooling) between blocks: 2 x 58 convs + stem + 3 transitions +
classifier = 121 layers. EENet's CIFAR model has growth rate k = 12 and a 3x3 stem conv to 2k
channels (1.04 M parameters on CIFAR-100, EENet Table 3); ``stem=imagenet`` gives the ImageNet form
(7x7/2 conv, BN, ReLU, 3x3/2 max pool; with k = 32 it is torchvision's densenet121).

Blocks are the 58 bottleneck layers (``dense<b>.<i>``), numbered like the papers number ResNet
blocks: two conv layers each, so EENet's exits "at the 12th, 36th and 84th layers" are blocks 6, 18
and 42, the last layers of dense blocks 1-3. EENet attaches those exits after the transitions
("due to transition layers"): the transition is folded into the unit of its block's last layer,
so an exit there reads the transition's output. ``native`` exit heads are EENet's: three 3x3 convs
with BN and ReLU (the first reducing the channels 4x), average pooling, FC.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from eenn.errors import EENNError
from eenn.models.backbones.base import BACKBONES, BackboneParts

STEMS = ("cifar", "imagenet")


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


def _transition(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2, 2))


def eenet_exit_head(
    block: str, in_shape: Sequence[int], num_classes: int, depth: int = 3, reduction: int = 4
) -> nn.Module:
    """EENet's ``exit_classifier``: ``depth`` 3x3 convs (BN, ReLU), the first to C / ``reduction``."""
    width = in_shape[0] // reduction
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [
            nn.Conv2d(in_shape[0] if i == 0 else width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


@BACKBONES.register("densenet", example={"blocks": [2, 2], "growth_rate": 4})
def densenet_backbone(
    num_classes: int,
    in_chans: int = 3,
    blocks: Sequence[int] = (6, 12, 24, 16),
    growth_rate: int = 12,
    bn_size: int = 4,
    reduction: float = 0.5,
    stem: str = "cifar",
) -> BackboneParts:
    if stem not in STEMS:
        raise EENNError(f"backbone.stem must be one of {STEMS}, got {stem!r}.")
    if not blocks or any(int(n) < 1 for n in blocks):
        raise EENNError(f"backbone.blocks must list positive layer counts per dense block, got {list(blocks)}.")
    channels = 2 * growth_rate
    if stem == "cifar":  # EENet's CIFAR stem has no BN/ReLU: every dense layer starts with them
        first: nn.Module = nn.Conv2d(in_chans, channels, 3, padding=1, bias=False)
    else:
        first = nn.Sequential(
            nn.Conv2d(in_chans, channels, 7, 2, 3, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
    units: list[tuple[str, nn.Module]] = [("stem", first)]
    stages = {}
    for b, n in enumerate(blocks, start=1):
        for i in range(int(n)):
            layer: nn.Module = DenseLayer(channels, growth_rate, bn_size)
            channels += growth_rate
            if i == n - 1 and b < len(blocks):
                out = int(channels * reduction)
                layer = nn.Sequential(layer, _transition(channels, out))
                channels = out
            units.append((f"dense{b}.{i}", layer))
        stages[f"dense{b}"] = units[-1][0]
    head = nn.Sequential(
        nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
    )
    return BackboneParts(
        units=units, head=head, blocks=[n for n, _ in units[1:]], stages=stages, exit_head=eenet_exit_head
    )
