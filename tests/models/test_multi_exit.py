import pytest
import torch

from eenn.errors import EENNError
from eenn.models import build_multi_exit
from eenn.models.backbones import BACKBONES
from eenn.models.multi_exit import resolve_exit_blocks

RESNET20 = {"name": "cifar_resnet", "depth": 20}


@pytest.mark.parametrize("head", ["linear", "conv_pool", "conv_stack"])
def test_shapes_and_stage_by_stage_equals_full_forward(head):
    net = build_multi_exit(RESNET20, {"at": "stages", "head": {"name": head}}, num_classes=7, input_shape=(3, 32, 32))
    net.eval()
    x = torch.randn(4, 3, 32, 32)
    full = net(x)
    assert full.shape == (4, 3, 7)
    staged = [logits for _, logits, _ in net.iter_exits(x)]
    torch.testing.assert_close(torch.stack(staged, 1), full)
    # stopping after exit 0 needs only stage 0: features carry over without recomputation
    h = net.forward_stage(0, x)
    torch.testing.assert_close(net.forward_exit(0, h), full[:, 0])
    h = net.forward_stage(1, h)
    torch.testing.assert_close(net.forward_exit(1, h), full[:, 1])
    torch.testing.assert_close(net.forward_backbone(x), full[:, -1])


def test_exit_placement_by_names_numbers_and_even_spacing():
    parts = BACKBONES.build("cifar_resnet", num_classes=10, depth=56)
    assert resolve_exit_blocks(parts, at="stages") == ["layer1.8", "layer2.8"]
    assert resolve_exit_blocks(parts, at=["layer1", "layer2.3"]) == ["layer1.8", "layer2.3"]
    assert resolve_exit_blocks(parts, at=[9, 18]) == ["layer1.8", "layer2.8"]
    # EENet supplement: ResNet-56 exits at layers 18 and 36 = blocks 9 and 18
    assert resolve_exit_blocks(parts, spacing="even", first=9, count=2) == ["layer1.8", "layer2.8"]
    assert resolve_exit_blocks(parts, spacing="even", first=3, count=3) == ["layer1.2", "layer2.1", "layer3.0"]


@pytest.mark.parametrize(
    "at, message",
    [
        ([30], "beyond the backbone's depth"),
        (["layer2", "layer1"], "increasing"),
        (["layer1", "layer1.8"], "same block twice"),
        (["layer3"], "last block"),
        (["conv9"], "not a block or stage"),
        ("everywhere", "must be a list"),
    ],
)
def test_bad_exit_placement_is_refused_clearly(at, message):
    parts = BACKBONES.build("cifar_resnet", num_classes=10, depth=56)
    with pytest.raises(EENNError, match=message):
        resolve_exit_blocks(parts, at=at)


def test_unknown_backbone_lists_valid_ones():
    with pytest.raises(EENNError, match="backbone.name='vgg'.*cifar_resnet.*timm"):
        build_multi_exit({"name": "vgg"}, {"at": "stages"}, 10, (3, 32, 32))


def test_timm_unknown_model_and_missing_checkpoint():
    with pytest.raises(EENNError, match="not a timm model"):
        build_multi_exit({"name": "timm", "model": "no_such_net"}, {"at": "stages"}, 10, (3, 32, 32))
    with pytest.raises(EENNError, match="backbone.checkpoint"):
        build_multi_exit(
            {"name": "timm", "model": "resnet18", "checkpoint": "/nope.safetensors"}, {"at": "stages"}, 10, (3, 32, 32)
        )
