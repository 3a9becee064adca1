"""CIFAR ResNets (He et al. 2016, sec. 4.2): 6n+2 layers, three groups of n basic blocks with
16/32/64 channels. ResNet-20/32/44/56/110 count 41/69/97/125/253 M multiply-accumulates."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eenn.errors import EENNError
from eenn.models.backbones.base import BACKBONES, BackboneParts


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = 0
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            if shortcut == "A":  # the paper's CIFAR option: parameter-free, subsample + zero-pad
                self.pad = cout - cin
            else:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            x = self.downsample(x)
        elif self.pad:
            x = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + x)


@BACKBONES.register("cifar_resnet", example={"depth": 8})
def cifar_resnet(num_classes: int, depth: int = 56, in_chans: int = 3, shortcut: str = "A") -> BackboneParts:
    if (depth - 2) % 6 or depth < 8:
        raise EENNError(f"backbone.depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}.")
    if shortcut not in ("A", "B"):
        raise EENNError(f"backbone.shortcut must be 'A' (zero-pad) or 'B' (1x1 conv), got {shortcut!r}.")
    n = (depth - 2) // 6
    units: list[tuple[str, nn.Module]] = [
        ("stem", nn.Sequential(nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)))
    ]
    cin, stages = 16, {}
    for g, cout in enumerate((16, 32, 64), start=1):
        for b in range(n):
            units.append((f"layer{g}.{b}", BasicBlock(cin, cout, 2 if (b == 0 and g > 1) else 1, shortcut)))
            cin = cout
        stages[f"layer{g}"] = f"layer{g}.{n - 1}"
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
    for m in [m for _, u in units for m in u.modules()]:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return BackboneParts(units=units, head=head, blocks=[name for name, _ in units[1:]], stages=stages)
