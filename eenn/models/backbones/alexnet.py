"""AlexNet as BranchyNet and DEEx use it, with their exits.

``variant=branchynet``: B-AlexNet for 32x32 CIFAR-10 images exactly as BranchyNet's released code
builds it (kunglab/branchynet ``networks/alex_cifar10.py``): conv 5x5/32, conv 5x5/64, conv 3x3/96,
96, 64 with ReLU, 3x3/2 max pooling and local response normalisation, then FC 256, 128 and the
classifier. Its two side branches (the ``native`` exit heads) start from the *pre-activation*
outputs of conv2 and conv3: branch 1 = ReLU, pool, LRN, two 3x3/32 convs, pool, FC; branch 2 =
ReLU, pool, LRN, one 3x3/32 conv, pool, FC.

``variant=imagenet``: torchvision's AlexNet (5 conv + 3 FC; 0.71 GMACs at 224x224), the backbone
DEEx fine-tunes from ImageNet weights on CIFAR-10 (sec. IV). ``resize`` upsamples the input inside
the network first (the pretrained filters expect ImageNet-scale objects; 32x32 images would also
shrink to nothing before conv5). DEEx's side branches are one FC layer each (sec. II): use the
``linear`` exit head.

Blocks are named after the conv/FC layer that ends them (``conv1`` .. ``conv5``, ``fc6``, ``fc7``);
BranchyNet's and DEEx's exits sit after ``conv2`` and ``conv3``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models import AlexNet_Weights, alexnet

from eenn.errors import EENNError
from eenn.models.backbones.base import BACKBONES, BackboneParts

VARIANTS = ("branchynet", "imagenet")


def _lrn() -> nn.Module:
    # Chainer's LRN(n=3, k=2, alpha=5e-5, beta=0.75) sums alpha * x^2 over the window; torch's
    # divides alpha by the window size, hence 3 * alpha.
    return nn.LocalResponseNorm(3, alpha=3 * 5e-5, beta=0.75, k=2.0)


def _pool() -> nn.Module:
    return nn.MaxPool2d(3, 2, ceil_mode=True)  # chainer's max_pooling_2d covers the border (cover_all)


@torch.no_grad()
def flat_size(layers: Sequence[nn.Module], in_shape: Sequence[int]) -> int:
    """Features per sample after ``layers`` on inputs of ``in_shape``: what the next FC layer takes."""
    return nn.Sequential(*layers)(torch.zeros(1, *in_shape)).numel()


def _branchynet_branch(block: str, in_shape: Sequence[int], num_classes: int) -> nn.Module:
    """BranchyNet's side branch after ``conv2`` (two convs) or ``conv3`` (one conv)."""
    convs = {"conv2": 2, "conv3": 1}
    if block not in convs:
        raise EENNError(
            f"exits.at: B-AlexNet has native branches only after {sorted(convs)}, not {block!r}; "
            "use another exits.head.name there."
        )
    layers: list[nn.Module] = [nn.ReLU(), _pool(), _lrn()]
    cin = in_shape[0]
    for _ in range(convs[block]):
        layers += [nn.Conv2d(cin, 32, 3, padding=1), nn.ReLU()]
        cin = 32
    layers += [_pool(), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(flat_size(layers, in_shape), num_classes))


def _branchynet(num_classes: int, in_chans: int, image_size: int) -> BackboneParts:
    units: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Sequential(nn.Conv2d(in_chans, 32, 5, padding=2), nn.ReLU(), _pool(), _lrn())),
        ("conv2", nn.Conv2d(32, 64, 5, padding=2)),
        ("conv3", nn.Sequential(nn.ReLU(), _pool(), _lrn(), nn.Conv2d(64, 96, 3, padding=1))),
        ("conv4", nn.Sequential(nn.ReLU(), nn.Conv2d(96, 96, 3, padding=1))),
        ("conv5", nn.Sequential(nn.ReLU(), nn.Conv2d(96, 64, 3, padding=1))),
    ]
    pool = [nn.ReLU(), _pool(), nn.Flatten()]
    flat = flat_size([u for _, u in units] + pool, (in_chans, image_size, image_size))
    units += [
        ("fc6", nn.Sequential(*pool, nn.Linear(flat, 256), nn.ReLU(), nn.Dropout(0.5))),
        ("fc7", nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Dropout(0.5))),
    ]
    return BackboneParts(
        units=units,
        head=nn.Linear(128, num_classes),
        blocks=[n for n, _ in units],
        stages={n: n for n, _ in units},
        exit_head=_branchynet_branch,
    )


def _imagenet_weights(pretrained: bool, checkpoint: str | None) -> dict[str, torch.Tensor] | None:
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise EENNError(f"backbone.checkpoint={checkpoint!r} does not exist.")
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not pretrained:
        return None
    try:
        return AlexNet_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError: no network
        raise EENNError(
            f"backbone.pretrained=true could not fetch AlexNet's ImageNet weights ({type(exc).__name__}); "
            "without network, pass a local torchvision AlexNet state dict as backbone.checkpoint=<path>."
        ) from None


def _imagenet(
    num_classes: int, in_chans: int, resize: int | None, pretrained: bool, checkpoint: str | None
) -> BackboneParts:
    model = alexnet(weights=None, num_classes=num_classes)
    if in_chans != 3:
        model.features[0] = nn.Conv2d(in_chans, 64, 11, 4, 2)
    state = _imagenet_weights(pretrained, checkpoint)
    if state is not None:
        own = model.state_dict()
        # a new class count gets a fresh classifier layer; everything else must match
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = sorted(set(own) - set(state) - {"classifier.6.weight", "classifier.6.bias"})
        if missing:
            raise EENNError(
                f"backbone.checkpoint: not a torchvision AlexNet state dict for in_chans={in_chans} "
                f"(missing or mis-shaped: {missing[:4]}...)."
            )
        model.load_state_dict(state, strict=False)
    f, c = model.features, model.classifier
    units: list[tuple[str, nn.Module]] = []
    if resize:
        units.append(("resize", nn.Upsample(size=(resize, resize), mode="bilinear", align_corners=False)))
    units += [
        ("conv1", f[0:3]),
        ("conv2", f[3:6]),
        ("conv3", f[6:8]),
        ("conv4", f[8:10]),
        ("conv5", f[10:13]),
        ("fc6", nn.Sequential(model.avgpool, nn.Flatten(), *c[0:3])),
        ("fc7", c[3:6]),
    ]
    blocks = [n for n, _ in units if n != "resize"]
    return BackboneParts(units=units, head=c[6], blocks=blocks, stages={n: n for n in blocks})


@BACKBONES.register("alexnet")
def alexnet_backbone(
    num_classes: int,
    in_chans: int = 3,
    variant: str = "branchynet",
    image_size: int = 32,
    resize: int | None = None,
    pretrained: bool = False,
    checkpoint: str | None = None,
) -> BackboneParts:
    """``image_size`` sizes B-AlexNet's first FC layer; ``resize``, ``pretrained`` and ``checkpoint``
    (local weights, offline) apply to the ImageNet variant."""
    if variant == "branchynet":
        if pretrained or checkpoint is not None or resize:
            raise EENNError(
                "backbone.variant=branchynet has no pretrained weights and no resize; "
                "those options are for backbone.variant=imagenet."
            )
        return _branchynet(num_classes, in_chans, image_size)
    if variant == "imagenet":
        return _imagenet(num_classes, in_chans, resize, pretrained, checkpoint)
    raise EENNError(f"backbone.variant must be one of {VARIANTS}, got {variant!r}.")
