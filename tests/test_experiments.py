"""Every paper setting in conf/experiment: it composes, its model builds, runs and has a cost
profile, its stage-1 optimiser and stage-2 policy are valid, and its smoke run (debug=smoke) trains
end to end on random data of the paper's shape; eenn-pipeline runs its stage 2. Also the datasets
those settings add (svhn, random)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from eenn.cli.common import conf_dir
from eenn.cost import profile_costs
from eenn.data import EENNDataModule
from eenn.data.sources import SOURCES
from eenn.errors import EENNError
from eenn.policies import build_policy
from eenn.rundir import PipelineRun, TrainRun
from eenn.tasks.pipeline import run_pipeline
from eenn.tasks.train import build_module, build_network, train

EXPERIMENTS = Path(__file__).resolve().parents[1] / "conf" / "experiment"
# ImageNet-sized MSDNet-35 (62 M parameters): building and profiling it takes ~30 s, training its
# smoke run ~90 s on two cores
SLOW = {"eenet_msdnet35_imagenet", "bilevel_msdnet_imagenet"}
SLOW_SMOKE = SLOW | {"distiller_resnet50_imagenet", "vit_cifar10_small"}  # the ViT's smoke twin runs by default
# the paper's image shape and class count per dataset config (what the smoke runs must imitate)
PAPER_DATA = {
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "imagefolder": ((3, 224, 224), 1000),
    "npz": ((3, 32, 32), 10),
    "random": ((3, 32, 32), 10),
}  # cifar10_small and its random stand-in
# exits per paper setting (K)
NUM_EXITS = {
    "branchynet_alexnet_cifar10": 3,
    "distiller_resnet32_cifar10": 2,
    "distiller_resnet50_imagenet": 3,
    "deex_alexnet_cifar10_binary": 3,
    "deex_alexnet_cifar10": 3,
    "eenet_resnet56_cifar10": 3,
    "eenet_densenet121_cifar100": 4,
    "eenet_msdnet35_imagenet": 5,
    "bilevel_msdnet_cifar10": 7,
    "bilevel_msdnet_cifar100": 7,
    "bilevel_msdnet_imagenet": 5,
    "vit_cifar10_small": 6,
    "vit_cifar10_small_smoke": 3,
}


def _params(names: set[str], slow: set[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in sorted(names)]


def test_every_paper_setting_is_listed():
    assert {p.stem for p in EXPERIMENTS.glob("*.yaml")} == set(NUM_EXITS)


@pytest.mark.parametrize("name", _params(set(NUM_EXITS), SLOW))
def test_experiment_composes_builds_runs_and_profiles(name, compose_cfg):
    cfg = compose_cfg("train", [f"experiment={name}"])
    smoke = compose_cfg("train", [f"experiment={name}", "debug=smoke"])

    # the smoke run differs in data, trainer, logger, cost and (no download) pretrained weights
    # only, and imitates the paper's data: the form its data config declares
    def model(c):
        backbone = {k: v for k, v in OmegaConf.to_container(c.backbone).items() if k != "pretrained"}
        return backbone, *(OmegaConf.to_container(c[g]) for g in ("exits", "training", "stage2"))

    assert model(cfg) == model(smoke)
    shape, classes = PAPER_DATA[cfg.data.name]
    classes = len(cfg.data.classes) if cfg.data.classes else classes
    assert tuple(cfg.data.meta.input_shape) == shape and cfg.data.meta.num_classes == classes
    assert smoke.data.name == "random" and smoke.data.meta == cfg.data.meta and smoke.data.classes is None

    dm = EENNDataModule(
        name="random",
        val_size=2,
        source_kwargs={"train_size": 4, "test_size": 2},
        meta=OmegaConf.to_container(smoke.data.meta, resolve=True),
    )
    network = build_network(smoke, dm)
    assert network.num_exits == NUM_EXITS[name]
    network.eval()
    with torch.no_grad():
        assert network(torch.randn(2, *shape)).shape == (2, NUM_EXITS[name], classes)
    costs = profile_costs(network, shape, latency=False)
    flops = costs.per_exit("flops")
    assert flops == sorted(flops) and costs.backbone["flops"] <= flops[-1]

    # stage 1's optimiser and schedule instantiate; stage 2's policy takes its options
    module = build_module(cfg, network, classes, costs)
    module.configure_optimizers()
    stage2 = OmegaConf.to_container(cfg.stage2)
    assert set(stage2) == {"cost", "policy", "sweep"}
    assert stage2["cost"] in ("flops", "macs", "latency")
    build_policy(**stage2["policy"])
    for group, values in stage2["sweep"].items():
        assert group in ("policy", "budget") and all(isinstance(v, list) and v for v in values.values())


@pytest.mark.parametrize("name", _params(set(NUM_EXITS), SLOW_SMOKE))
def test_smoke_run_trains_two_batches_and_writes_a_complete_run_dir(name, compose_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose_cfg("train", [f"experiment={name}", "debug=smoke"])
    assert cfg.data.name == "random" and cfg.trainer.limit_train_batches == 2 and cfg.cost.repeats == 2
    metrics = train(cfg)
    run = TrainRun(cfg.paths.output_dir)
    k = NUM_EXITS[name]
    assert run.checkpoint("best").is_file() and run.checkpoint("last").is_file()
    assert (run.path / "csv" / "metrics.csv").is_file()
    costs = run.costs()
    assert len(costs.exits) == k and metrics["exit_names"] == [e.name for e in costs.exits]
    assert run.metrics()["epochs"] == 1
    for split in ("val", "test"):
        p = run.predictions(split)
        assert p.logits.shape[1:] == (k, cfg.data.meta.num_classes)


@pytest.mark.slow
def test_the_pipeline_runs_an_experiments_stage2(compose_cfg, monkeypatch):
    """eenn-pipeline experiment=<name> fits the paper's policy over the paper's sweep (here DEEx's p_d)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose_cfg("pipeline", ["experiment=deex_alexnet_cifar10_binary", "debug=smoke"])
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):  # the pipeline composes eenn-fit's config
        comp = run_pipeline(cfg)
    fits = sorted(p.name for p in PipelineRun(cfg.paths.output_dir).fit_dir.iterdir())
    p_ds = cfg.stage2.sweep.policy.p_d
    assert fits == sorted(f"deex_p_d={v}" for v in p_ds)
    assert {r["policy"] for r in comp.rows} == {"deex"} and len(comp.rows) == len(p_ds)
    assert {r["cost_unit"] for r in comp.rows} == {"latency_ms"}


# ------------------------------------------------------------------ datasets
def test_cifar10_catdog_is_deexs_binary_split(compose_cfg):
    data = compose_cfg("train", ["data=cifar10_catdog"]).data
    assert data.name == "cifar10" and list(data.classes) == ["cat", "dog"] and data.val_size == 0.1


def test_imagenet_holds_out_50000_training_images_and_eenet_25000(compose_cfg):
    assert compose_cfg("train", ["data=imagenet"]).data.val_size == 50000
    assert compose_cfg("train", ["experiment=eenet_msdnet35_imagenet"]).data.val_size == 25000


def test_svhn_without_files_names_root_and_download(tmp_path):
    with pytest.raises(EENNError, match=r"svhn is not in data.root=.*data.download=false"):
        SOURCES.build("svhn", root=str(tmp_path), download=False)


def test_random_source_is_seeded_balanced_and_shaped():
    a = SOURCES.build("random", image_shape=[1, 8, 6], num_classes=3, train_size=9, test_size=4, seed=1)
    b = SOURCES.build("random", image_shape=[1, 8, 6], num_classes=3, train_size=9, test_size=4, seed=1)
    assert a.x_train.shape == (9, 1, 8, 6) and a.x_train.dtype == torch.uint8 and a.x_test.shape == (4, 1, 8, 6)
    assert torch.bincount(a.y_train).tolist() == [3, 3, 3] and a.class_names == ["class0", "class1", "class2"]
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    with pytest.raises(EENNError, match="image_shape"):
        SOURCES.build("random", image_shape=[8, 8])


# ------------------------------------------------------------------ ViT
def test_the_vit_settings_smoke_twin_is_its_recipe_on_a_small_vit_and_trains(compose_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    full = compose_cfg("train", ["experiment=vit_cifar10_small"])
    cfg = compose_cfg("train", ["experiment=vit_cifar10_small_smoke", "trainer.enable_progress_bar=false"])
    # the same recipe: only the model's size, the data and the length of the run differ
    assert {k: v for k, v in cfg.training.items() if k != "scheduler"} == {
        k: v for k, v in full.training.items() if k != "scheduler"
    }
    assert (
        cfg.training.scheduler._target_ == full.training.scheduler._target_ == "eenn.training.schedules.warmup_cosine"
    )
    assert full.training.optimizer._target_ == "torch.optim.AdamW" and full.training.mixup_alpha > 0
    assert full.training.cutmix_alpha > 0 and full.training.label_smoothing > 0
    assert (full.backbone.name, full.backbone.img_size, full.backbone.patch_size) == ("deit_tiny_patch16_224", 32, 4)
    assert cfg.exits.head == full.exits.head
    metrics = train(cfg)
    run = TrainRun(cfg.paths.output_dir)
    assert metrics["exit_names"] == ["blocks.1", "blocks.3", "final"] and run.metrics()["epochs"] == 2
    assert run.predictions("test").logits.shape == (64, 3, 10)
    lrs = [float(r["lr-AdamW"]) for r in csv.DictReader((run.path / "csv" / "metrics.csv").open()) if r.get("lr-AdamW")]
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-3)  # epoch 0 warms up, epoch 1 at the peak


def test_the_pipeline_trains_for_an_experiments_epochs(compose_cfg):
    # the pipeline's own config once set trainer.max_epochs, so every experiment trained for 15 epochs
    train = compose_cfg("train", ["experiment=eenet_resnet56_cifar10"]).trainer.max_epochs
    assert compose_cfg("pipeline", ["experiment=eenet_resnet56_cifar10"]).trainer.max_epochs == train == 150
    assert compose_cfg("pipeline", []).trainer.max_epochs == compose_cfg("train", []).trainer.max_epochs
