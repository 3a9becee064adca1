"""MSDNet (Huang et al., ICLR 2018), layer for layer as the authors' PyTorch code builds it
(kalviny/MSDNet-PyTorch ``models/msdnet.py``; EENet and the budget-aware EENN paper use it as is).

Every layer keeps feature maps at ``len(gr_factor)`` scales (finest first); layer l adds
``growth_rate * gr_factor[s]`` channels at scale s from a 3x3 conv of the same scale and a strided
3x3 conv of the finer one (each behind a 1x1 bottleneck of at most ``bn_factor[s]`` x its width).
With ``prune=max`` the finest scale is dropped every ceil(L / scales) layers, where a 1x1
transition halves the channels (``reduction``). The network is ``n_blocks`` blocks; block b has
``base`` layers (b = 1) then ``step`` (``stepmode=even``) or ``step * (b-1) + 1`` (``lin_grow``).
Its classifiers read the coarsest scale: two 3x3/2 convs (128 channels on CIFAR, as many as the
input on ImageNet), 2x2 average pooling, FC; they are this family's ``native`` exit heads, and the
last one is its head. ``stem=imagenet``: 7x7/2 conv and 3x3/2 max pooling first.

Units: ``stem`` (the first layer, making the scales), then ``layer1`` .. ``layerL`` (a layer plus
its transition, if any); the ``block<b>`` stages end where MSDNet places its classifiers, so
``exits.at: stages`` puts an exit at each of them.

Settings used by the papers (``conf/backbone``): the budget-aware EENN paper's CIFAR model (supp. C:
3 scales, 16/32/64 channels, growth rates 6/12/24, 7 classifiers at layers sum_{i<=k} i, i.e.
``lin_grow`` with base = step = 1) and EENet's ImageNet MSDNet-35 (4 scales, 32 channels, growth 16
with factors 1-2-4-4, base = step = 7: classifiers at layers 7k + 7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from eenn.errors import EENNError
from eenn.models.backbones.base import BACKBONES, BackboneParts

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}  # gelu: the budget-aware EENN authors' code (gphi_MSDNet)
STEPMODES = ("even", "lin_grow")
STEMS = ("cifar", "imagenet")


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, act: type[nn.Module]) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), act()]


def _conv_basic(cin: int, cout: int, kernel: int, stride: int, act: type[nn.Module]) -> nn.Module:
    return nn.Sequential(*_conv_bn(cin, cout, kernel, stride, act))


def _conv_bottleneck(
    cin: int, cout: int, stride: int, bn_width: int, bottleneck: bool, act: type[nn.Module]
) -> nn.Module:
    """MSDNet's ConvBN: optional 1x1 bottleneck to min(cin, bn_width * cout), then a 3x3 conv."""
    layers: list[nn.Module] = []
    inner = cin
    if bottleneck:
        inner = min(cin, bn_width * cout)
        layers += _conv_bn(cin, inner, 1, 1, act)
    return nn.Sequential(*layers, *_conv_bn(inner, cout, 3, stride, act))


class _ConvNormal(nn.Module):
    """New channels at the finest kept scale from that scale alone."""

    def __init__(self, cin: int, cout: int, bn_width: int, bottleneck: bool, act: type[nn.Module]) -> None:
        super().__init__()
        self.conv_normal = _conv_bottleneck(cin, cout, 1, bn_width, bottleneck, act)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([x[0], self.conv_normal(x[0])], 1)


class _ConvDownNormal(nn.Module):
    """New channels at a scale from the finer scale (strided) and the same scale, half each."""

    def __init__(
        self, cin_fine: int, cin: int, cout: int, bn_fine: int, bn: int, bottleneck: bool, act: type[nn.Module]
    ) -> None:
        super().__init__()
        self.conv_down = _conv_bottleneck(cin_fine, cout // 2, 2, bn_fine, bottleneck, act)
        self.conv_normal = _conv_bottleneck(cin, cout // 2, 1, bn, bottleneck, act)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([x[1], self.conv_down(x[0]), self.conv_normal(x[1])], 1)


class FirstLayer(nn.Module):
    """The stem: the image at every scale (each scale a strided conv of the finer one)."""

    def __init__(self, cin: int, channels: Sequence[int], stem: str, act: type[nn.Module]) -> None:
        super().__init__()
        if stem == "cifar":
            first = _conv_basic(cin, channels[0], 3, 1, act)
        else:  # the reference code's ImageNet stem conv has a bias
            first = nn.Sequential(
                nn.Conv2d(cin, channels[0], 7, 2, 3), nn.BatchNorm2d(channels[0]), act(), nn.MaxPool2d(3, 2, 1)
            )
        self.layers = nn.ModuleList(
            [first] + [_conv_basic(channels[s - 1], channels[s], 3, 2, act) for s in range(1, len(channels))]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


class MSDNLayer(nn.Module):
    """One dense layer across the kept scales; drops the finest input scale when ``in_scales`` >
    ``out_scales``."""

    def __init__(
        self,
        cin: int,
        growth: int,
        gr: Sequence[int],
        bn: Sequence[int],
        in_scales: int,
        out_scales: int,
        bottleneck: bool,
        act: type[nn.Module],
    ) -> None:
        super().__init__()
        n = len(gr)
        self.discard = in_scales - out_scales
        self.out_scales = out_scales
        offset = n - out_scales
        if self.discard > 0:
            first: nn.Module = _ConvDownNormal(
                cin * gr[offset - 1], cin * gr[offset], growth * gr[offset], bn[offset - 1], bn[offset], bottleneck, act
            )
        else:
            first = _ConvNormal(cin * gr[offset], growth * gr[offset], bn[offset], bottleneck, act)
        self.layers = nn.ModuleList(
            [first]
            + [
                _ConvDownNormal(cin * gr[s - 1], cin * gr[s], growth * gr[s], bn[s - 1], bn[s], bottleneck, act)
                for s in range(offset + 1, n)
            ]
        )

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.discard > 0:
            inputs = [[x[s - 1], x[s]] for s in range(1, self.out_scales + 1)]
        else:
            inputs = [[x[0]]] + [[x[s - 1], x[s]] for s in range(1, self.out_scales)]
        return [layer(inp) for layer, inp in zip(self.layers, inputs)]


class Parallel(nn.Module):
    """One module per scale (MSDNet's transitions)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.m = nn.ModuleList(modules)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        return [m(xs) for m, xs in zip(self.m, x)]


class Classifier(nn.Module):
    """MSDNet's classifier on the coarsest scale: two 3x3/2 convs, 2x2 average pooling, FC."""

    def __init__(self, cin: int, num_classes: int, width: int | None, act: type[nn.Module]) -> None:
        super().__init__()
        width = width or cin
        self.m = nn.Sequential(
            _conv_basic(cin, width, 3, 2, act), _conv_basic(width, width, 3, 2, act), nn.AvgPool2d(2), nn.Flatten()
        )
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        return self.linear(self.m(x[-1] if isinstance(x, (list, tuple)) else x))


def block_steps(n_blocks: int, base: int, step: int, stepmode: str) -> list[int]:
    """Layers per block: ``base`` then ``step`` each (even) or ``step * b + 1`` (lin_grow)."""
    if stepmode not in STEPMODES:
        raise EENNError(f"backbone.stepmode must be one of {STEPMODES}, got {stepmode!r}.")
    return [base] + [step if stepmode == "even" else step * b + 1 for b in range(1, n_blocks)]


@BACKBONES.register("msdnet", example={"n_blocks": 2, "channels": 4, "growth_rate": 2})
def msdnet_backbone(
    num_classes: int,
    in_chans: int = 3,
    n_blocks: int = 7,
    base: int = 1,
    step: int = 1,
    stepmode: str = "lin_grow",
    channels: int = 16,
    growth_rate: int = 6,
    gr_factor: Sequence[int] = (1, 2, 4),
    bn_factor: Sequence[int] = (1, 2, 4),
    bottleneck: bool = True,
    reduction: float = 0.5,
    stem: str = "cifar",
    activation: str = "relu",
) -> BackboneParts:
    if stem not in STEMS:
        raise EENNError(f"backbone.stem must be one of {STEMS}, got {stem!r}.")
    if activation not in ACTIVATIONS:
        raise EENNError(f"backbone.activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
    if len(bn_factor) != len(gr_factor):
        raise EENNError(
            f"backbone.bn_factor {list(bn_factor)} needs one entry per scale of gr_factor {list(gr_factor)}."
        )
    if n_blocks < 1 or base < 1 or step < 1:
        raise EENNError(f"backbone.n_blocks, base and step must be >= 1, got {n_blocks}, {base}, {step}.")
    act = ACTIVATIONS[activation]
    gr, bn, n_scales = list(gr_factor), list(bn_factor), len(gr_factor)
    steps = block_steps(n_blocks, base, step, stepmode)
    n_layers = sum(steps)
    interval = math.ceil(n_layers / n_scales)  # prune=max: drop the finest scale every `interval` layers
    units: list[tuple[str, nn.Module]] = [("stem", FirstLayer(in_chans, [channels * g for g in gr], stem, act))]
    stages, cin, layer = {}, channels, 0
    for b, n in enumerate(steps, start=1):
        for _ in range(n):
            layer += 1
            in_scales = n_scales - max(0, layer - 2) // interval
            out_scales = n_scales - (layer - 1) // interval
            modules: list[nn.Module] = [MSDNLayer(cin, growth_rate, gr, bn, in_scales, out_scales, bottleneck, act)]
            cin += growth_rate
            if in_scales > out_scales and reduction > 0:
                out = math.floor(reduction * cin)
                offset = n_scales - out_scales
                modules.append(
                    Parallel(
                        [_conv_basic(cin * gr[offset + s], out * gr[offset + s], 1, 1, act) for s in range(out_scales)]
                    )
                )
                cin = out
            units.append((f"layer{layer}", modules[0] if len(modules) == 1 else nn.Sequential(*modules)))
        stages[f"block{b}"] = f"layer{layer}"
    width = 128 if stem == "cifar" else None  # CIFAR classifiers: 128 channels; ImageNet: the input's

    def exit_head(block: str, in_shape: Sequence[int], num_classes: int) -> nn.Module:
        return Classifier(in_shape[0], num_classes, width, act)

    head = Classifier(cin * gr[-1], num_classes, width, act)
    return BackboneParts(units=units, head=head, blocks=[n for n, _ in units[1:]], stages=stages, exit_head=exit_head)
