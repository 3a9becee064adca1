"""Every registered exit head keeps the head contract: built from a stage's feature shape, it maps
a batch of that stage's features to (B, classes) logits, a sample's logits do not depend on the
batch it came in (eval mode), it trains, and it is refused in one sentence for the other kind of
features; ``auto`` picks a head of the right kind."""

from __future__ import annotations

import pytest
import torch

from eenn.errors import EENNError
from eenn.models.backbones.base import Tokens
from eenn.models.heads import DEFAULT_HEAD, FEATURES, HEADS, build_head, reads

SHAPES = {"maps": (16, 6, 6), "tokens": (10, 16)}  # (C, H, W) maps; (N, D) tokens after one class token
TOKENS = Tokens(pool="token", prefix_tokens=1)


def _build(name: str, kind: str) -> torch.nn.Module:
    return build_head(name, SHAPES[kind], 5, None if kind == "maps" else TOKENS, **HEADS.example(name))


@pytest.mark.parametrize("name", HEADS.names())
def test_head(name):
    kind = reads(name)
    assert kind in FEATURES
    torch.manual_seed(0)
    head = _build(name, kind).eval()
    x = torch.randn(6, *SHAPES[kind])
    out = head(x)
    assert out.shape == (6, 5) and torch.isfinite(out).all()
    with torch.no_grad():  # each sample alone gives what it gave in the batch
        alone = torch.cat([head(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(alone, out.detach(), rtol=1e-4, atol=1e-5)
    head.train()
    head(x).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


@pytest.mark.parametrize("name", HEADS.names())
def test_a_head_is_refused_for_the_other_kind_of_features(name):
    other = next(k for k in FEATURES if k != reads(name))
    with pytest.raises(EENNError, match=rf"exits.head.name='{name}' reads .*; use one of .*\(or auto\)"):
        _build(name, other)


@pytest.mark.parametrize("kind", list(FEATURES))
def test_auto_picks_the_default_head_of_the_kind(kind):
    assert reads(DEFAULT_HEAD[kind]) == kind
    head = build_head("auto", SHAPES[kind], 5, None if kind == "maps" else TOKENS)
    assert head(torch.randn(2, *SHAPES[kind])).shape == (2, 5)
