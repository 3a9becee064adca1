"""What a backbone hands to the multi-exit network: sequential units, where exits may go, its head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from eenn.registry import Registry


@dataclass
class BackboneParts:
    """A backbone cut into the sequence of units its feature extractor runs.

    ``units`` composed in order are the backbone's feature extractor and ``head`` (pooling +
    classifier) turns their output into logits, so ``head(units(x))`` is the plain backbone.
    ``blocks`` names the units after which an exit may be placed, in depth order: block number l
    (1-based, as the papers count layers) is ``blocks[l - 1]``. ``stages`` maps a stage name
    (``layer1``, ``blocks.3``...) to the block that ends it.

    ``exit_head``, for families whose exits are part of the architecture (MSDNet's classifiers,
    BranchyNet's branches), builds the exit after a block: ``exit_head(block=name,
    in_shape=(C, H, W), num_classes=n, **exits.head)``; ``exits.head.name: native`` selects it.
    A unit may output a list of multi-scale tensors (MSDNet); exit heads read its last (coarsest).
    """

    units: list[tuple[str, nn.Module]]
    head: nn.Module
    blocks: list[str]
    stages: dict[str, str] = field(default_factory=dict)
    exit_head: Callable[..., nn.Module] | None = None


BACKBONES: Registry[BackboneParts] = Registry("backbone family", "backbone.name")
