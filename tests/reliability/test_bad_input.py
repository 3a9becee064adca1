"""Bad input to stage 1: one clear sentence naming the key or file, and nothing written."""

from pathlib import Path

import pytest

from eenn.errors import EENNError
from eenn.tasks.train import train

BASE = [
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "cost.latency=false",
    "trainer.enable_progress_bar=false",
]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["exits.at=[30]"], "exits.at: block 30 is beyond the backbone's depth (blocks 1..9)."),
        (["exits.at=[layer2,layer1]"], "exits.at must go deeper with each exit (increasing)"),
        (["exits.at=[layer1,3]"], "exits.at names the same block twice"),
        (["training.loss_weights=[0.2,0.2,0.2,0.4]"], "training.loss_weights has 4 values; the network has 3 exits"),
        (["training.loss_weights=[-0.2,0.6,0.6]"], "training.loss_weights must be non-negative"),
        (
            ["data=cifar10", "data.root=/nonexistent"],
            "cifar10 is not in data.root='/nonexistent' and data.download=false",
        ),
        (["data.classes=[]"], "data.classes is an empty list"),
        (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path='/nonexistent/last.ckpt' does not exist."),
        (
            ["backbone.name=vgg"],
            "backbone.name='vgg' is not a known backbone family; valid: alexnet, cifar_resnet, densenet, lenet, "
            "msdnet, timm",
        ),
        (
            ["exits.head.name=mlp"],
            "exits.head.name='mlp' is not a known exit head type; valid: conv_pool, conv_stack, linear",
        ),
    ],
)
def test_bad_stage1_input_is_one_sentence_and_leaves_nothing(compose_cfg, overrides, message):
    cfg = compose_cfg("train", [*BASE, *overrides])
    with pytest.raises(EENNError) as err:
        train(cfg)
    assert message in str(err.value)
    assert str(err.value).count("\n") == 0
    assert not Path(cfg.paths.output_dir).exists()


def test_checkpoint_of_another_model_is_refused(compose_cfg, tmp_path):
    cfg = compose_cfg("train", BASE)
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    other = compose_cfg("train", [*BASE, "data.classes=[0,1]", f"ckpt_path={ckpt}"])
    other.paths.output_dir = str(tmp_path / "other")
    with pytest.raises(
        EENNError,
        match=r"does not fit this model \(.* tensors differ in shape, e.g. .*: checkpoint \(10, .*\) vs model \(2, ",
    ):
        train(other)
    assert not (tmp_path / "other").exists()
