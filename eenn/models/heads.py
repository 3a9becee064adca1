"""Exit heads: what turns a stage's feature map into class logits at an early exit."""

from __future__ import annotations

from torch import nn

from eenn.registry import Registry

HEADS: Registry[nn.Module] = Registry("exit head type", "exits.head.name")


def _conv_bn_relu(cin: int, cout: int, bn: bool) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=not bn), *([nn.BatchNorm2d(cout)] if bn else []), nn.ReLU(inplace=True)]


@HEADS.register("linear")
def linear_head(in_channels: int, num_classes: int) -> nn.Module:
    """BranchyNet-style: global average pool, then one linear layer."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))


@HEADS.register("conv_pool")
def conv_pool_head(in_channels: int, num_classes: int, width: int | None = None, bn: bool = True) -> nn.Module:
    """Distiller-style: one 3x3 conv to give the exit its own features, pool, linear read-out."""
    width = width or in_channels
    return nn.Sequential(
        *_conv_bn_relu(in_channels, width, bn), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)
    )


@HEADS.register("conv_stack")
def conv_stack_head(
    in_channels: int, num_classes: int, depth: int = 3, width: int | None = None, bn: bool = False
) -> nn.Module:
    """EENet's ImageNet exits: ``depth`` 3x3 convs with ReLU, pool, linear."""
    width = width or in_channels
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += _conv_bn_relu(in_channels if i == 0 else width, width, bn)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
