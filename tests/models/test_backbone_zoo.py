"""The papers' backbones: published cost and size counts, their exits, stage-by-stage execution."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from eenn.cost import profile_costs
from eenn.errors import EENNError
from eenn.models import build_multi_exit
from eenn.models.backbones import BACKBONES
from tests.contracts import checks


def composed(backbone: str, exits: str, *overrides: str) -> tuple[dict, dict]:
    """conf/backbone/<backbone>.yaml and conf/exits/<exits>.yaml as eenn-train composes them, so a
    drift in the real configs fails the published counts."""
    cfg = checks.compose_app("train", [f"backbone={backbone}", f"exits={exits}", *overrides])
    return OmegaConf.to_container(cfg.backbone, resolve=True), OmegaConf.to_container(cfg.exits, resolve=True)


def build(backbone: str, exits: str, num_classes: int, shape: tuple[int, ...], *overrides: str) -> nn.Module:
    return build_multi_exit(*composed(backbone, exits, *overrides), num_classes, shape)


def _cumulative_params(net: nn.Module) -> list[float]:
    """Parameters (M) a sample has run through up to each exit: stages 0..k and heads 0..k."""
    out, total = [], 0
    for k in range(net.num_exits):
        total += sum(p.numel() for m in (net.stages[k], net.heads[k]) for p in m.parameters())
        out.append(total / 1e6)
    return out


# ------------------------------------------------------------------ published counts
def test_resnet56_costs_125m_macs():
    # He et al. 2016 (CIFAR ResNet-56, EENet's CIFAR-10 backbone): 125 M multiply-accumulates
    net = build("resnet56", "eenet_resnet56", 10, (3, 32, 32))
    costs = profile_costs(net, (3, 32, 32), latency=False)
    assert costs.backbone["macs"] == pytest.approx(125e6, rel=0.03)


def test_msdnet_cifar_last_exit_costs_137m_flops():
    # Budget-aware EENN (Addad et al.) sec. 4: "an accuracy of 96.13% for its last exit with 137M
    # FLOPs" on its 7-classifier CIFAR MSDNet (supp. C); MSDNet's FLOPs are multiply-adds counted
    # through every classifier on the way, like our cumulative cost of the last exit.
    net = build("msdnet_cifar", "msdnet", 10, (3, 32, 32))
    costs = profile_costs(net, (3, 32, 32), latency=False)
    assert net.exit_names == ["layer1", "layer3", "layer6", "layer10", "layer15", "layer21", "final"]
    assert costs.exits[-1].macs == pytest.approx(137e6, rel=0.03)


def test_msdnet_cifar_anytime_model_has_the_reference_parameter_count():
    # kalviny/MSDNet-PyTorch check_msdnet/log.txt: nBlocks=10, stepmode=even, step=2, base=4,
    # nChannels=16, CIFAR-10 -> "# of params: 4839544" (classifiers included)
    anytime = ["backbone.n_blocks=10", "backbone.stepmode=even", "backbone.step=2", "backbone.base=4"]
    net = build("msdnet_cifar", "msdnet", 10, (3, 32, 32), *anytime)
    assert sum(p.numel() for p in net.parameters()) == 4_839_544


def test_densenet121_cifar100_matches_eenet_table3():
    # EENet Table 3, DenseNet121 on CIFAR-100: 1.04 M parameters without exits; 0.06 / 0.25 / 0.86 M
    # up to exits 1-3 (exits after the transitions). EENet publishes no FLOPs count for it.
    net = build("densenet121_cifar", "eenet_densenet121", 100, (3, 32, 32))
    costs = profile_costs(net, (3, 32, 32), latency=False)
    assert net.exit_names == ["dense1.5", "dense2.11", "dense3.23", "final"]
    assert costs.backbone["params"] == pytest.approx(1.04e6, rel=0.03)
    assert _cumulative_params(net)[:3] == pytest.approx([0.06, 0.25, 0.86], abs=0.005)
    assert [e.macs for e in costs.exits] == sorted(e.macs for e in costs.exits)


def test_densenet121_imagenet_form_is_torchvisions():
    # torchvision's densenet121 (Huang et al. 2017): 7,978,856 parameters, 2.83 GFLOPS in its docs
    # (torchvision's GFLOPS count multiply-adds)
    net = build("densenet121", "stages", 1000, (3, 224, 224), "exits.at=[]")
    costs = profile_costs(net, (3, 224, 224), latency=False)
    assert costs.backbone["params"] == 7_978_856
    assert costs.backbone["macs"] == pytest.approx(2.83e9, rel=0.03)


def test_alexnet_imagenet_is_torchvisions():
    # torchvision's AlexNet (DEEx's backbone): 61.1 M parameters, 0.71 GFLOPS (multiply-adds) at 224
    net = build("alexnet", "deex_alexnet", 1000, (3, 224, 224))
    costs = profile_costs(net, (3, 224, 224), latency=False)
    assert costs.backbone["params"] == pytest.approx(61.1e6, rel=0.01)
    assert costs.backbone["macs"] == pytest.approx(0.71e9, rel=0.03)


@pytest.mark.parametrize("model, published_gmacs", [("deit_tiny_patch16_224", 1.26), ("vit_small_patch16_224", 4.6)])
def test_vit_and_deit_macs_match_published_counts(model, published_gmacs):
    # timm's model cards and benchmark tables (fvcore counts, attention's matmuls included): DeiT-Ti
    # 1.26 GMACs (1.3 on the card), ViT-S/16 4.6 GMACs, at 224 px
    net = build("timm", "stages", 1000, (3, 224, 224), f"backbone.name={model}", "exits.at=[]")
    costs = profile_costs(net, (3, 224, 224), latency=False)
    assert costs.backbone["macs"] == pytest.approx(published_gmacs * 1e9, rel=0.03)


@pytest.mark.slow
def test_msdnet35_matches_eenet_table3():
    # EENet Table 3, MSDNet35 on ImageNet: 8.76 / 20.15 / 31.73 / 41.86 / 62.31 M parameters up to
    # each of its 5 exits. No FLOPs count is published for it (we measure 3.25 G MACs to the last exit).
    net = build("msdnet35_imagenet", "msdnet", 1000, (3, 224, 224))
    assert net.exit_names == ["layer7", "layer14", "layer21", "layer28", "final"]
    assert _cumulative_params(net) == pytest.approx([8.76, 20.15, 31.73, 41.86, 62.31], abs=0.005)


# ------------------------------------------------------------------ BranchyNet's layouts
def test_b_alexnet_has_branchynets_layer_sizes():
    # kunglab/branchynet networks/alex_cifar10.py: Linear(1024, 256) in the main network, branches
    # ending in Linear(512, 10) and Linear(128, 10); these sizes need chainer's cover-all pooling.
    net = build("alexnet_cifar", "branchynet_alexnet", 10, (3, 32, 32))
    linears = [
        [m.in_features for m in part.modules() if isinstance(m, nn.Linear)]
        for part in (net.heads[0], net.heads[1], net.stages[2], net.heads[2])
    ]
    assert linears == [[512], [128], [1024, 256], [128]]
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 3, 10)


def test_b_lenet_has_branchynets_layer_sizes():
    # kunglab/branchynet networks/lenet_mnist.py: branch Linear(640, 10), main Linear(720, 84)
    net = build("lenet", "branchynet_lenet", 10, (1, 28, 28))
    assert [m.in_features for m in net.heads[0].modules() if isinstance(m, nn.Linear)] == [640]
    assert [m.in_features for m in net.stages[1].modules() if isinstance(m, nn.Linear)] == [720]
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 2, 10)


# ------------------------------------------------------------------ running stage by stage
@pytest.mark.parametrize(
    "backbone, exits, shape, overrides",
    [
        ("msdnet_cifar", "msdnet", (3, 32, 32), []),
        ("msdnet_cifar", "stages", (3, 32, 32), ["exits.at=[2,9]"]),  # registry heads on scales
        ("densenet121_cifar", "msdnet", (3, 32, 32), []),  # native heads after every stage
        ("alexnet_cifar", "branchynet_alexnet", (3, 32, 32), []),
        ("lenet", "branchynet_lenet", (1, 8, 8), ["backbone.image_size=8"]),
    ],
)
def test_stage_by_stage_equals_the_full_forward(backbone, exits, shape, overrides):
    torch.manual_seed(0)
    net = build(backbone, exits, 7, shape, *overrides).eval()
    x = torch.randn(3, *shape)
    full = net(x)
    assert full.shape == (3, net.num_exits, 7)
    staged = torch.stack([logits for _, logits, _ in net.iter_exits(x)], 1)
    torch.testing.assert_close(staged, full)
    torch.testing.assert_close(net.forward_backbone(x), full[:, -1])


def test_msdnet_stages_hand_on_multi_scale_features():
    net = build("msdnet_cifar", "msdnet", 10, (3, 32, 32)).eval()
    h = net.forward_stage(0, torch.randn(1, 3, 32, 32))
    assert [tuple(t.shape[1:]) for t in h] == [(22, 32, 32), (44, 16, 16), (88, 8, 8)]


# ------------------------------------------------------------------ clear refusals
@pytest.mark.parametrize(
    "backbone, exits, message",
    [
        (
            {"name": "cifar_resnet", "depth": 20},
            {"at": "stages", "head": {"name": "native"}},
            "backbone.name='cifar_resnet' has no exit heads of its own",
        ),
        ({"name": "alexnet"}, {"at": ["conv4"], "head": {"name": "native"}}, "native branches only after"),
        ({"name": "alexnet", "variant": "vgg"}, {"at": []}, "backbone.variant must be one of"),
        ({"name": "alexnet", "pretrained": True}, {"at": []}, "for backbone.variant=imagenet"),
        ({"name": "msdnet", "stepmode": "grow"}, {"at": []}, "backbone.stepmode"),
        ({"name": "msdnet", "bn_factor": [1, 2]}, {"at": []}, "one entry per scale"),
        ({"name": "densenet", "stem": "tiny"}, {"at": []}, "backbone.stem"),
    ],
)
def test_bad_backbone_options_are_refused_clearly(backbone, exits, message):
    with pytest.raises(EENNError, match=message):
        build_multi_exit(backbone, exits, 10, (3, 32, 32))


def test_alexnet_pretrained_offline_asks_for_a_local_checkpoint(monkeypatch):
    from torchvision.models import AlexNet_Weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(AlexNet_Weights.IMAGENET1K_V1, "get_state_dict", offline)
    with pytest.raises(EENNError, match="backbone.checkpoint=<path>"):
        BACKBONES.build("alexnet", num_classes=2, variant="imagenet", pretrained=True)


def test_timm_pretrained_offline_asks_for_a_local_checkpoint(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(EENNError, match="backbone.pretrained=true could not fetch resnet50.*backbone.checkpoint"):
        BACKBONES.build("timm", num_classes=10, model="resnet50", pretrained=True)


def test_alexnet_checkpoint_must_be_a_torchvision_state_dict(tmp_path):
    with pytest.raises(EENNError, match="does not exist"):
        BACKBONES.build("alexnet", num_classes=2, variant="imagenet", checkpoint=str(tmp_path / "none.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(EENNError, match="not a torchvision AlexNet state dict"):
        BACKBONES.build("alexnet", num_classes=2, variant="imagenet", checkpoint=str(bad))


@pytest.mark.slow
def test_alexnet_loads_a_local_checkpoint_with_a_new_classifier(tmp_path):
    from torchvision.models import alexnet

    ref = alexnet(weights=None)
    torch.save(ref.state_dict(), tmp_path / "alexnet.pth")
    parts = BACKBONES.build("alexnet", num_classes=2, variant="imagenet", checkpoint=str(tmp_path / "alexnet.pth"))
    torch.testing.assert_close(dict(parts.units)["conv1"][0].weight, ref.features[0].weight)
    assert parts.head.out_features == 2
