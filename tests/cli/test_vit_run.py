"""A ViT as a new user trains one (issue 14's command), then every stage-2 policy fits on the run."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from eenn.cli.common import conf_dir
from eenn.policies import POLICIES, policy_class
from eenn.rundir import TrainRun
from eenn.tasks.fit import fit_run
from eenn.tasks.train import train

COMMAND = [
    "data=random",
    "backbone=timm",
    "backbone.name=vit_tiny_patch16_224",
    "+backbone.img_size=32",
    "+backbone.patch_size=4",
    "exits=stages",
    "debug=fast",
]


def _compose(app: str, overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name=app, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> Path:
    """eenn-train data=random backbone=timm backbone.name=vit_tiny_patch16_224 +backbone.img_size=32
    +backbone.patch_size=4 exits=stages debug=fast"""
    run = tmp_path_factory.mktemp("vit") / "train"
    metrics = train(_compose("train", [*COMMAND, "logger=csv", "trainer.enable_progress_bar=false"], run))
    assert metrics["exit_names"] == [*(f"blocks.{i}" for i in range(11)), "final"]  # an exit after every block
    return run


def test_the_issue_command_writes_predictions_and_a_cost_profile(vit_run):
    run = TrainRun(vit_run)
    costs = run.costs()
    assert len(costs.exits) == 12 and costs.per_exit("flops") == sorted(costs.per_exit("flops"))
    for split in ("val", "test"):
        assert run.predictions(split).logits.shape[1:] == (12, 10)


@pytest.mark.parametrize("policy", POLICIES.names())
def test_every_policy_fits_on_the_vit_run(vit_run, tmp_path, policy):
    example = [f"policy.{k}={v}" for k, v in policy_class(policy).examples[0].items()]
    # a policy fitted to something else than a budget (risk: epsilon) takes it as a ceiling: none here
    budget = "budget.fraction=0.6" if policy_class(policy).budgeted else "budget.fraction=1.0"
    metrics = fit_run(
        _compose("fit", [f"run_dir={vit_run}", f"policy={policy}", *example, budget, "wandb.enabled=false"], tmp_path),
        tmp_path,
    )
    assert metrics["policy"] == policy and 0 <= metrics["test"]["accuracy"] <= 1
