"""Exit heads: what turns a stage's features into class logits at an early exit.

Two kinds of features reach an exit: feature maps (B, C, H, W) from CNNs, and channels-last
tokens, (B, N, D) from ViTs or (B, H, W, D) from Swin. Each head reads one kind (its registry
metadata ``reads``: ``HEADS.meta(name)["reads"]``), and
``exits.head.name: auto`` picks the kind's default (``DEFAULT_HEAD``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import global_pool_nlc
from torch import nn

from eenn.errors import EENNError
from eenn.models.backbones.base import Tokens
from eenn.registry import Registry

HEADS: Registry[nn.Module] = Registry("exit head type", "exits.head.name")
DEFAULT_HEAD = {"maps": "conv_pool", "tokens": "token"}
FEATURES = {"maps": "feature maps (B, C, H, W)", "tokens": "tokens (B, N, D)"}


def _head(name: str, reads: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register exit head ``name``, which reads ``maps`` or ``tokens``."""
    if reads not in FEATURES:
        raise ValueError(f"a head reads one of {list(FEATURES)}, not {reads!r}")
    return HEADS.register(name, reads=reads)


def reads(name: str) -> str:
    """The features head ``name`` reads: ``maps`` or ``tokens``."""
    return str(HEADS.meta(name)["reads"])


def _conv_bn_relu(cin: int, cout: int, bn: bool) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=not bn),
        *([nn.BatchNorm2d(cout)] if bn else []),
        nn.ReLU(inplace=True),
    ]


@_head("linear", reads="maps")
def linear_head(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """BranchyNet-style: global average pool, then one linear layer."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_shape[0], num_classes))


@_head("conv_pool", reads="maps")
def conv_pool_head(in_shape: tuple[int, ...], num_classes: int, width: int | None = None, bn: bool = True) -> nn.Module:
    """Distiller-style: one 3x3 conv to give the exit its own features, pool, linear read-out."""
    width = width or in_shape[0]
    return nn.Sequential(
        *_conv_bn_relu(in_shape[0], width, bn), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)
    )


@_head("conv_stack", reads="maps")
def conv_stack_head(
    in_shape: tuple[int, ...], num_classes: int, depth: int = 3, width: int | None = None, bn: bool = False
) -> nn.Module:
    """EENet's ImageNet exits: ``depth`` 3x3 convs with ReLU, pool, linear."""
    width = width or in_shape[0]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += _conv_bn_relu(in_shape[0] if i == 0 else width, width, bn)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class AsTokens(nn.Module):
    """(B, H, W, D) maps of a hierarchical transformer as (B, H*W, D) tokens; (B, N, D) as it is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1, -2) if x.ndim > 3 else x


class TokenPool(nn.Module):
    """The model's own pooling of its tokens (timm's ``global_pool_nlc``): class token or a reduction."""

    def __init__(self, tokens: Tokens) -> None:
        super().__init__()
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens
        return global_pool_nlc(
            x, pool_type=t.pool, num_prefix_tokens=t.prefix_tokens, reduce_include_prefix=t.include_prefix
        )


@_head("token", reads="tokens")
def token_head(in_shape: tuple[int, ...], num_classes: int, tokens: Tokens) -> nn.Module:
    """A ViT's own head at an earlier block: LayerNorm, the model's pooling, linear."""
    dim = in_shape[-1]
    return nn.Sequential(AsTokens(), nn.LayerNorm(dim), TokenPool(tokens), nn.Linear(dim, num_classes))


@_head("token_mlp", reads="tokens")
def token_mlp_head(in_shape: tuple[int, ...], num_classes: int, tokens: Tokens, hidden: int | None = None) -> nn.Module:
    """LayerNorm, the model's pooling, then a two-layer GELU MLP (``hidden`` units; default the width)."""
    dim = in_shape[-1]
    hidden = hidden or dim
    return nn.Sequential(
        AsTokens(),
        nn.LayerNorm(dim),
        TokenPool(tokens),
        nn.Linear(dim, hidden),
        nn.GELU(),
        nn.Linear(hidden, num_classes),
    )


@_head("token_attn", reads="tokens")
def token_attn_head(
    in_shape: tuple[int, ...], num_classes: int, tokens: Tokens, num_heads: int = 4, mlp_ratio: float = 1.0
) -> nn.Module:
    """Attention pooling (timm's ``AttentionPoolLatent``: a learned query attends over every token,
    then a residual MLP), as early-exit ViTs use for their exits; then linear."""
    dim = in_shape[-1]
    if dim % num_heads:
        raise EENNError(f"exits.head.num_heads={num_heads} does not divide the token width {dim}.")
    return nn.Sequential(
        AsTokens(),
        nn.LayerNorm(dim),
        AttentionPoolLatent(dim, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_layer=nn.LayerNorm),
        nn.Linear(dim, num_classes),
    )


def build_head(
    name: str, in_shape: tuple[int, ...], num_classes: int, tokens: Tokens | None, **kwargs: Any
) -> nn.Module:
    """Exit head ``name`` (``auto``: the default for the features) for features of shape ``in_shape``
    (without the batch), tokens pooled per ``tokens`` or, if it is None, feature maps."""
    kind = "maps" if tokens is None else "tokens"
    name = DEFAULT_HEAD[kind] if name == "auto" else name
    factory = HEADS.get(name)
    if reads(name) != kind:
        fits = ", ".join(n for n in HEADS.names() if reads(n) == kind)
        raise EENNError(
            f"exits.head.name={name!r} reads {FEATURES[reads(name)]}, but this backbone's exits get "
            f"{FEATURES[kind]}; use one of {fits} (or auto)."
        )
    return factory(
        in_shape=in_shape, num_classes=num_classes, **({} if tokens is None else {"tokens": tokens}), **kwargs
    )
