"""What a backbone hands to the multi-exit network: sequential units, where exits may go, its head."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from eenn.registry import Registry


@dataclass(frozen=True)
class Tokens:
    """Units that hand on channels-last tokens, (B, N, D) (ViT) or (B, H, W, D) (Swin), instead
    of (B, C, H, W) feature maps; exit heads pool them as the model's own head does (timm's
    ``global_pool``): ``pool="token"`` reads the class token, ``avg``/``max``/``avgmax`` reduce
    the tokens after the ``prefix_tokens`` class/register/distillation tokens (all of them with
    ``include_prefix``)."""

    pool: str = "avg"
    prefix_tokens: int = 0
    include_prefix: bool = False


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

    ``tokens`` says that the units hand on tokens (see :class:`Tokens`), ``None`` feature maps.
    ``check(input_shape)``, for families split from a model that also runs whole (timm), refuses
    by name a split whose units and head composed do not give what the whole model gives.
    """

    units: list[tuple[str, nn.Module]]
    head: nn.Module
    blocks: list[str]
    stages: dict[str, str] = field(default_factory=dict)
    exit_head: Callable[..., nn.Module] | None = None
    tokens: Tokens | None = None
    check: Callable[[Sequence[int]], None] | None = None


BACKBONES: Registry[BackboneParts] = Registry("backbone family", "backbone.name")
