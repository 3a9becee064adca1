"""Stage 1 end to end, in-process: the real configs composed by Hydra, a tiny training on digits."""

import json
from pathlib import Path

import hydra
import pytest
import torch

from eenn.cost import CostProfile
from eenn.errors import EENNError
from eenn.predictions import Predictions
from eenn.tasks.train import train

FAST = ["trainer.max_epochs=1", "cost.latency=true", "cost.repeats=2", "trainer.enable_progress_bar=false"]


def test_one_epoch_writes_a_complete_run_dir_and_an_offline_wandb_run(compose_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg("train", ["data=digits", "backbone=resnet20", "exits=stages", *FAST])
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)

    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    costs = CostProfile.from_dict(json.loads((run / "costs.json").read_text()))
    assert [e.name for e in costs.exits] == ["layer1.2", "layer2.2", "final"]
    written = json.loads((run / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert set(written["test_accuracy"]) == {"layer1.2", "layer2.2", "final"}

    sizes = {"val": 287, "test": 360}
    for split, n in sizes.items():
        p = Predictions.load(run / "predictions" / f"{split}.safetensors")
        assert p.logits.shape == (n, 3, 10) and p.labels.shape == (n,) and p.split == split
        assert p.costs.tolist() == costs.per_exit("flops")
        assert p.exit_names == ["layer1.2", "layer2.2", "final"] and p.class_names[0] == "0"
        assert set(p.cost_table) == {"macs", "params", "latency_ms"}
        assert p.accuracy_per_exit().tolist() == pytest.approx(list(written[f"{split}_accuracy"].values()))

    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    wandb_files = list(offline[0].glob("*.wandb"))
    assert wandb_files and wandb_files[0].stat().st_size > 0
    assert list(offline[0].glob("files/media/table/costs_*.table.json"))  # the cost table as a wandb.Table
    assert (run / "csv" / "metrics.csv").is_file()


def test_digits_reaches_95_percent_and_exits_differ_in_quality(compose_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose_cfg(
        "train",
        [
            "data=digits",
            "backbone=resnet20",
            "exits=stages",
            "logger=csv",
            "trainer.max_epochs=4",
            "cost.latency=false",
            "trainer.enable_progress_bar=false",
        ],
    )
    acc = train(cfg)["test_accuracy"]
    assert acc["final"] >= 0.95
    assert acc["layer1.2"] < acc["final"]


def test_joint_options_warmup_kl_and_weights(compose_cfg):
    cfg = compose_cfg(
        "train",
        [
            "logger=csv",
            "training.loss_weights=eenet",
            "training.kl_alpha=0.5",
            "training.kl_start=0.5",
            "training.warmup_epochs=1",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            "cost.latency=false",
            "trainer.enable_progress_bar=false",
        ],
    )
    train(cfg)
    rows = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    kl = [r.split(",")[header.index("train/kl")] for r in rows[1:]]
    kl = [float(v) for v in kl if v]
    assert kl[0] == 0.0 and kl[-1] > 0.0  # KL off in epoch 0, on from epoch 1 (= 0.5 * 2 epochs)


def test_missing_checkpoint_to_resume_from_is_refused(compose_cfg):
    cfg = compose_cfg("train", ["logger=csv", "ckpt_path=/nonexistent/last.ckpt"])
    with pytest.raises(EENNError, match="ckpt_path='/nonexistent/last.ckpt' does not exist"):
        train(cfg)


def test_warmup_trains_only_the_final_exit(compose_cfg):
    from eenn.data import EENNDataModule
    from eenn.tasks.train import build_network
    from eenn.training.joint import JointTraining

    cfg = compose_cfg("train", [])
    dm = EENNDataModule()
    net = build_network(cfg, dm)
    module = JointTraining(net, 10, optimizer=torch.optim.SGD, warmup_epochs=2, loss_weights="uniform")
    assert module.current_weights().tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "overrides",
    [
        ["training=joint"],
        ["training=joint_adam_multistep"],
        ["training=bilevel"],
        ["training=joint", "training/optimizer=adamw", "~training/scheduler"],
        ["training=joint", "training/optimizer=adam", "training/scheduler=multistep", "training.optimizer.lr=0.01"],
    ],
)
def test_optimiser_and_schedule_presets_are_swapped_whole(compose_cfg, overrides):
    """An optimiser chosen by group gets none of another's keys (Adam refuses `momentum`)."""
    cfg = compose_cfg("train", overrides)
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = hydra.utils.instantiate(cfg.training.optimizer)(params=params)
    assert type(opt).__name__ == cfg.training.optimizer._target_.rsplit(".", 1)[1]
    if "momentum" not in cfg.training.optimizer:
        assert "momentum" not in opt.defaults
    scheduler = cfg.training.get("scheduler")
    if scheduler is not None:
        sched = hydra.utils.instantiate(scheduler)(optimizer=opt)
        opt.step()
        sched.step()
    assert ("~training/scheduler" in overrides) == (scheduler is None)
