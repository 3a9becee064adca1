"""The multi-exit network: backbone stages with an exit head after each, the last exit being the
backbone's own classifier. It runs whole (all K exits' logits) or stage by stage, so an engine can
stop after exit k without recomputing anything."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from eenn.errors import EENNError, is_number
from eenn.models.backbones import BACKBONES, BackboneParts
from eenn.models.heads import HEADS, build_head

# What a stage hands on: one feature map, or (MSDNet) a list of maps from finest to coarsest scale.
Features = torch.Tensor | list[torch.Tensor]


class Coarsest(nn.Module):
    """Feeds an exit head the coarsest map of a multi-scale unit's output (MSDNet's classifiers do)."""

    def forward(self, x: Features) -> torch.Tensor:
        return x[-1] if isinstance(x, (list, tuple)) else x


class MultiExitNetwork(nn.Module):
    """``stages[k]`` maps the previous stage's features to exit k's input; ``heads[k]`` gives its logits."""

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[nn.Module], exit_names: Sequence[str]) -> None:
        super().__init__()
        if not (len(stages) == len(heads) == len(exit_names)):
            raise ValueError("stages, heads and exit_names must have one entry per exit")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.exit_names = list(exit_names)

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def forward_stage(self, k: int, features: Features) -> Features:
        """Run stage k on the features that stage k-1 produced (the input image for k=0)."""
        return self.stages[k](features)

    def forward_exit(self, k: int, features: Features) -> torch.Tensor:
        """Exit k's logits from stage k's output."""
        return self.heads[k](features)

    def iter_exits(self, x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, Features]]:
        """Yield (k, logits_k, features_k) exit by exit; stop iterating to stop computing."""
        for k in range(self.num_exits):
            x = self.forward_stage(k, x)
            yield k, self.forward_exit(k, x), x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All exits' logits, shape (B, K, C)."""
        return torch.stack([logits for _, logits, _ in self.iter_exits(x)], dim=1)

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        """The plain backbone (no early-exit heads): the last exit's logits."""
        for k in range(self.num_exits):
            x = self.forward_stage(k, x)
        return self.forward_exit(self.num_exits - 1, x)


def resolve_exit_blocks(
    parts: BackboneParts,
    at: Sequence[Any] | str | None = None,
    spacing: str | None = None,
    first: int | None = None,
    count: int | None = None,
) -> list[str]:
    """Turn the ``exits`` config into the ordered names of the blocks that get an early exit.

    ``at``: block names, stage names (``layer1``: the block ending it), 1-based block numbers, or
    ``"stages"`` (after every stage but the last). ``spacing="even"``: EENet's supplement,
    l_k = l_0 + k·ΔL with l_0 = ``first`` and ΔL = floor((N - l_0) / count) for ``count`` exits.
    """
    n = len(parts.blocks)
    last_unit = parts.units[-1][0]
    if spacing is not None:
        if spacing != "even":
            raise EENNError(f"exits.spacing must be 'even' or null, got {spacing!r}.")
        if at:
            raise EENNError("exits.at and exits.spacing=even both set; give one of them.")
        if first is None or count is None or count < 1 or not 1 <= first <= n:
            raise EENNError(
                f"exits.spacing=even needs exits.first in [1, {n}] and exits.count >= 1, got first={first}, "
                f"count={count}."
            )
        delta = (n - first) // count
        if delta < 1 and count > 1:
            raise EENNError(f"exits.count={count} exits from block {first} do not fit in the backbone's {n} blocks.")
        at = [first + k * delta for k in range(count)]
    if at == "stages":
        at = list(parts.stages)[:-1]
    if isinstance(at, str) or at is None:
        raise EENNError(f"exits.at must be a list of block names/numbers or 'stages', got {at!r}.")
    names: list[str] = []
    for item in at:
        if not (isinstance(item, str) or is_number(item, integer=True)):
            raise EENNError(f"exits.at entries must be block names or 1-based numbers, got {item!r}.")
        if isinstance(item, int):
            if not 1 <= item <= n:
                raise EENNError(f"exits.at: block {item} is beyond the backbone's depth (blocks 1..{n}).")
            names.append(parts.blocks[item - 1])
        elif item in parts.stages:
            names.append(parts.stages[item])
        elif item in parts.blocks:
            names.append(item)
        else:
            raise EENNError(
                f"exits.at: {item!r} is not a block or stage of this backbone; stages: {list(parts.stages)}, "
                f"blocks: {parts.blocks[0]} .. {parts.blocks[-1]}."
            )
    positions = [parts.blocks.index(nm) for nm in names]
    if len(set(positions)) != len(positions):
        raise EENNError(f"exits.at names the same block twice: {list(at)}.")
    if positions != sorted(positions):
        raise EENNError(f"exits.at must go deeper with each exit (increasing), got {list(at)}.")
    if names and names[-1] == last_unit:
        raise EENNError(
            f"exits.at: {names[-1]!r} is the backbone's last block, where its own classifier already exits."
        )
    return names


@torch.no_grad()
def _feature_shapes(
    units: Sequence[tuple[str, nn.Module]], input_shape: Sequence[int]
) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Shape (without the batch) of the features an exit head reads after every unit (the coarsest scale of a
    multi-scale unit), and the names of the multi-scale units, from one dry run in eval mode (so
    batch norm statistics are untouched)."""
    x: Features = torch.zeros(1, *input_shape)
    shapes, multiscale = {}, set()
    modes = [m.training for _, m in units]
    for _, m in units:
        m.eval()
    for name, m in units:
        x = m(x)
        if isinstance(x, (list, tuple)):
            multiscale.add(name)
        shapes[name] = tuple(Coarsest()(x).shape[1:])
    for (_, m), mode in zip(units, modes):
        m.train(mode)
    return shapes, multiscale


def build_multi_exit(
    backbone: dict[str, Any],
    exits: dict[str, Any],
    num_classes: int,
    input_shape: Sequence[int],
) -> MultiExitNetwork:
    """Build the network from the ``backbone`` (``name`` of a registered family + its arguments) and
    ``exits`` config groups.

    ``exits.head.name: native`` uses the backbone family's own exit heads (MSDNet, B-AlexNet, B-LeNet);
    ``auto`` (or no head) the default head for the features the backbone hands on (maps or tokens).
    A backbone split from a whole model (timm) is checked to reproduce it before anything else is built.
    """
    family, backbone = BACKBONES.resolve(backbone["name"], {k: v for k, v in backbone.items() if k != "name"})
    # every backbone takes pretrained=false (debug=smoke sets it): a family without weights of its own
    # has no such argument and refuses true
    if "pretrained" not in inspect.signature(BACKBONES.get(family)).parameters and backbone.pop("pretrained", False):
        raise EENNError(f"backbone.pretrained=true: backbone.name={family!r} has no pretrained weights.")
    parts = BACKBONES.build(family, num_classes=num_classes, in_chans=int(input_shape[0]), **backbone)
    exits = dict(exits)
    head_cfg = dict(exits.pop("head", None) or {"name": "auto"})
    head_type = head_cfg.pop("name")
    unknown = set(exits) - {"at", "spacing", "first", "count"}
    if unknown:
        raise EENNError(f"exits has unknown keys {sorted(unknown)}; expected at, spacing, first, count, head.")
    if head_type == "native" and parts.exit_head is None:
        raise EENNError(
            f"exits.head.name=native: backbone.name={family!r} has no exit heads of its own; "
            f"use one of {', '.join(HEADS.names())}."
        )
    exit_blocks = resolve_exit_blocks(parts, **exits)
    if parts.check is not None:
        parts.check(input_shape)
    shapes, multiscale = _feature_shapes(parts.units, input_shape)
    stages, heads, current = [], [], []
    cuts = set(exit_blocks)
    for name, unit in parts.units:
        current.append(unit)
        if name in cuts:
            stages.append(nn.Sequential(*current))
            if head_type == "native":
                head = parts.exit_head(block=name, in_shape=shapes[name], num_classes=num_classes, **head_cfg)
            else:
                head = build_head(head_type, shapes[name], num_classes, parts.tokens, **head_cfg)
                if name in multiscale:
                    head = nn.Sequential(Coarsest(), head)
            heads.append(head)
            current = []
    stages.append(nn.Sequential(*current))
    heads.append(parts.head)
    return MultiExitNetwork(stages, heads, [*exit_blocks, "final"])
