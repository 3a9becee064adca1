"""Every timm model is either split into units that give exactly what timm gives, or refused by name.

The equality test builds the multi-exit network, then a second, independent timm model with the
same (perturbed, so that no zero-initialised layer hides a difference) weights, and compares the
final exit with ``timm.create_model(name, ...)(x)`` in eval mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from eenn.errors import EENNError
from eenn.models import build_multi_exit
from eenn.models.backbones import BACKBONES
from eenn.models.backbones import timm_backbone as tb
from eenn.models.backbones.base import Tokens
from eenn.models.heads import build_head

ROOT = Path(__file__).resolve().parents[2]
TINY_VIT = {"img_size": 32, "patch_size": 4, "depth": 4}
TINY_SWIN = {"img_size": 32, "window_size": 2, "embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}
# (timm model, its arguments, image side): one small member of each family
FAMILIES = [
    ("resnet10t", {}, 32),
    ("resnext26ts", {}, 32),
    ("regnetx_002", {}, 32),
    ("efficientnet_b0", {}, 32),
    ("mobilenetv3_small_050", {}, 32),
    ("mobilenetv2_050", {}, 32),
    ("mnasnet_small", {}, 32),
    ("lcnet_050", {}, 32),
    ("convnext_atto", {}, 32),
    ("densenet121", {}, 32),
    ("dla34", {}, 32),
    ("dpn48b", {}, 32),
    ("repvgg_a0", {}, 32),
    ("hgnetv2_b0", {}, 32),
    ("rexnet_100", {}, 32),
    ("mobilevit_xxs", {}, 64),
    ("vit_tiny_patch16_224", TINY_VIT, 32),
    ("vit_base_patch16_reg4_gap_256", {**TINY_VIT, "embed_dim": 64, "num_heads": 2}, 32),  # register tokens, avg pool
    ("deit_tiny_patch16_224", TINY_VIT, 32),
    ("deit_tiny_distilled_patch16_224", TINY_VIT, 32),  # distillation token, two heads averaged
    ("swin_tiny_patch4_window7_224", TINY_SWIN, 32),
]
SLOW_FAMILIES = [
    ("cspresnet50", {}, 64),
    ("inception_v3", {}, 96),
    ("poolformer_s12", {}, 32),
    ("edgenext_xx_small", {}, 64),
    ("fastvit_t8", {}, 64),
    ("efficientformer_l1", {}, 224),
    ("maxvit_tiny_tf_224", {}, 224),
    ("swinv2_cr_tiny_ns_224", {"img_size": 32}, 32),
    ("nf_resnet26", {}, 32),
]


def _split_and_timm(monkeypatch, name, kwargs, side, at):
    """The multi-exit network and the timm model that its backbone was cut from."""
    made = []
    create = timm.create_model

    def recording(*args, **kw):
        made.append(create(*args, **kw))
        return made[-1]

    monkeypatch.setattr(tb.timm, "create_model", recording)
    net = build_multi_exit({"name": name, **kwargs}, {"at": at}, num_classes=5, input_shape=(3, side, side))
    return net, made[0]


@pytest.mark.parametrize(
    "name, kwargs, side",
    [*FAMILIES, *(pytest.param(*f, marks=pytest.mark.slow) for f in SLOW_FAMILIES)],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_the_final_exit_is_the_timm_model(monkeypatch, name, kwargs, side):
    torch.manual_seed(0)
    net, source = _split_and_timm(monkeypatch, name, kwargs, side, at=[1])
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = timm.create_model(name, num_classes=5, **kwargs)
    ref.load_state_dict(source.state_dict())
    net.eval()
    ref.eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        want, got, all_exits = ref(x), net.forward_backbone(x), net(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(all_exits[:, -1], want, atol=1e-5, rtol=0)
    assert all_exits.shape == (2, 2, 5)


@pytest.mark.parametrize(
    "name, why",
    [
        ("ghostnet_050", "differ from the model's own forward"),  # its forward does work outside its children
        ("vgg11", "run one after another fail"),  # forward_head reaches for a unit (pre_logits)
        ("levit_128s", "run one after another fail"),  # a token model split as a CNN
        ("hrnet_w18_small", "are not top-level units"),  # parallel branches, no sequence of stages
    ],
)
def test_a_model_that_does_not_split_is_refused_by_name(name, why):
    side = 224 if name == "levit_128s" else 64  # LeViT's attention biases are sized for 224 px
    with pytest.raises(EENNError) as err:
        build_multi_exit({"name": name}, {"at": [1]}, num_classes=5, input_shape=(3, side, side))
    msg = str(err.value)
    assert msg.startswith(f"backbone.name={name!r}") and "cannot be split" in msg and why in msg
    assert "\n" not in msg


def test_eenn_train_refuses_an_unsplittable_model_with_exit_code_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "eenn.cli.train",
            "data=random",
            "backbone=timm",
            "backbone.name=ghostnet_050",
            "debug=fast",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "backbone.name='ghostnet_050' (GhostNet) cannot be split into stages" in res.stderr
    assert "Traceback" not in res.stderr


def test_the_split_runs_timms_own_code_and_shares_its_weights(monkeypatch):
    net, source = _split_and_timm(monkeypatch, "vit_tiny_patch16_224", TINY_VIT, 32, at=[2])
    embed = net.stages[0][0]
    assert embed.steps == ["patch_embed", "_pos_embed", "patch_drop", "norm_pre"]
    assert embed.model.cls_token is source.cls_token and embed.model.pos_embed is source.pos_embed
    assert net.stages[1][0] is source.blocks[2]
    # no parameter is held twice, and none is left out
    assert sum(p.numel() for p in net.stages.parameters()) + sum(p.numel() for p in net.heads[-1].parameters()) == sum(
        p.numel() for p in source.parameters()
    )
    # 8 x 8 patch tokens + the class token, position-embedded, reach the first exit
    with torch.no_grad():
        tokens = net.forward_stage(0, torch.randn(1, 3, 32, 32))
    assert tokens.shape == (1, 65, 192)


def test_vit_exits_go_after_any_block_and_evenly():
    def names(exits):
        return build_multi_exit(
            {"name": "vit_tiny_patch16_224", **TINY_VIT, "depth": 12}, exits, 5, (3, 32, 32)
        ).exit_names

    assert names({"at": [4, 8]}) == ["blocks.3", "blocks.7", "final"]
    assert names({"spacing": "even", "first": 3, "count": 3}) == ["blocks.2", "blocks.5", "blocks.8", "final"]
    assert names({"at": "stages"})[:2] == ["blocks.0", "blocks.1"]  # timm's feature_info: every block


def test_a_timm_model_is_named_by_backbone_name_or_backbone_model():
    by_name = build_multi_exit({"name": "vit_tiny_patch16_224", "model": None, **TINY_VIT}, {"at": [1]}, 5, (3, 32, 32))
    by_model = build_multi_exit(
        {"name": "timm", "model": "vit_tiny_patch16_224", **TINY_VIT}, {"at": [1]}, 5, (3, 32, 32)
    )
    assert by_name.exit_names == by_model.exit_names == ["blocks.0", "final"]
    with pytest.raises(
        EENNError,
        match="backbone.name='vit_tiny_patch16_224' names one model and "
        "backbone.model='resnet18' another; give one of them.",
    ):
        build_multi_exit({"name": "vit_tiny_patch16_224", "model": "resnet18"}, {"at": [1]}, 5, (3, 32, 32))
    with pytest.raises(
        EENNError,
        match=r"backbone.name='vit_tiny_patch16_224' does not run on images of shape "
        r"\[3, 32, 32\] .*\+backbone.img_size",
    ):
        build_multi_exit({"name": "vit_tiny_patch16_224"}, {"at": [1]}, 5, (3, 32, 32))
    with pytest.raises(EENNError, match="or any timm model name"):
        BACKBONES.resolve("vgg", {})


# ------------------------------------------------------------------------------ exit heads
@pytest.mark.parametrize("head", ["token", "token_mlp", "token_attn"])
@pytest.mark.parametrize(
    "name, kwargs", [("deit_tiny_patch16_224", TINY_VIT), ("swin_tiny_patch4_window7_224", TINY_SWIN)]
)
def test_token_heads_on_vit_and_swin_tokens(name, kwargs, head):
    net = build_multi_exit({"name": name, **kwargs}, {"at": [1], "head": {"name": head}}, 5, (3, 32, 32)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = net(x)
        staged = torch.stack([logits for _, logits, _ in net.iter_exits(x)], 1)
    assert out.shape == (3, 2, 5)
    torch.testing.assert_close(staged, out)


def test_the_token_head_pools_as_the_model_does():
    # DeiT reads its class token; the GAP ViT averages the patch tokens after its 4 register tokens
    deit = build_multi_exit({"name": "deit_tiny_patch16_224", **TINY_VIT}, {"at": [1]}, 5, (3, 32, 32))
    gap = build_multi_exit(
        {"name": "vit_base_patch16_reg4_gap_256", **TINY_VIT, "embed_dim": 64, "num_heads": 2},
        {"at": [1]},
        5,
        (3, 32, 32),
    )
    assert [(h[2].tokens.pool, h[2].tokens.prefix_tokens) for h in (deit.heads[0], gap.heads[0])] == [
        ("token", 1),
        ("avg", 4),
    ]
    x = torch.zeros(1, 7, 64)
    x[0, 0] = 1.0  # only the first (class or register) token is set
    assert gap.heads[0][2](x).abs().max() == 0 and deit.heads[0][2](x).abs().max() == 1


@pytest.mark.parametrize("head", ["conv_pool", "linear", "conv_stack"])
def test_a_convolutional_head_on_tokens_is_refused_naming_the_key(head):
    with pytest.raises(EENNError) as err:
        build_multi_exit(
            {"name": "vit_tiny_patch16_224", **TINY_VIT}, {"at": [1], "head": {"name": head}}, 5, (3, 32, 32)
        )
    assert str(err.value) == (
        f"exits.head.name={head!r} reads feature maps (B, C, H, W), but this backbone's exits get "
        "tokens (B, N, D); use one of token, token_attn, token_mlp (or auto)."
    )


def test_a_token_head_on_feature_maps_is_refused_and_auto_picks_by_kind():
    with pytest.raises(EENNError, match="exits.head.name='token' reads tokens"):
        build_head("token", (16, 8, 8), 5, None)
    assert isinstance(build_head("auto", (16, 8, 8), 5, None)[0], torch.nn.Conv2d)  # conv_pool
    assert isinstance(build_head("auto", (17, 16), 5, Tokens(pool="token", prefix_tokens=1))[1], torch.nn.LayerNorm)
