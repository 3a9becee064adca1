"""B-LeNet for small grey images, as BranchyNet's released code builds it for MNIST
(kunglab/branchynet ``networks/lenet_mnist.py``): conv 5x5/5, 5x5/10, 5x5/20 (padding 3), each
followed by 2x2 max pooling and ReLU, FC 84, then the classifier (no activation between the two
FC layers, as in that code). Its one side branch (the ``native`` exit head) starts from conv1's
output: pool, ReLU, conv 3x3/10, pool, ReLU, FC.

Blocks: ``conv1``, ``conv2``, ``conv3``, ``fc4``; BranchyNet's exit sits after ``conv1``.
``image_size`` (28 for MNIST) sizes the FC layers.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from eenn.errors import EENNError
from eenn.models.backbones.alexnet import flat_size
from eenn.models.backbones.base import BACKBONES, BackboneParts


def _pool() -> nn.Module:
    return nn.MaxPool2d(2, 2, ceil_mode=True)  # chainer's max_pooling_2d covers the border (cover_all)


def _branch(block: str, in_shape: Sequence[int], num_classes: int) -> nn.Module:
    if block != "conv1":
        raise EENNError(
            f"exits.at: B-LeNet has its native branch only after 'conv1', not {block!r}; "
            "use another exits.head.name there."
        )
    layers = [_pool(), nn.ReLU(), nn.Conv2d(in_shape[0], 10, 3, padding=1), _pool(), nn.ReLU(), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(flat_size(layers, in_shape), num_classes))


@BACKBONES.register("lenet", example={"image_size": 32})
def lenet_backbone(num_classes: int, in_chans: int = 1, image_size: int = 28) -> BackboneParts:
    units: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(in_chans, 5, 5, padding=3)),
        ("conv2", nn.Sequential(_pool(), nn.ReLU(), nn.Conv2d(5, 10, 5, padding=3))),
        ("conv3", nn.Sequential(_pool(), nn.ReLU(), nn.Conv2d(10, 20, 5, padding=3))),
    ]
    pool = [_pool(), nn.ReLU(), nn.Flatten()]
    flat = flat_size([u for _, u in units] + pool, (in_chans, image_size, image_size))
    units.append(("fc4", nn.Sequential(*pool, nn.Linear(flat, 84))))
    return BackboneParts(
        units=units,
        head=nn.Linear(84, num_classes),
        blocks=[n for n, _ in units],
        stages={n: n for n, _ in units},
        exit_head=_branch,
    )
