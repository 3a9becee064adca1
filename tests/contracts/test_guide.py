"""CONTRIBUTING.md's guide to adding a policy, a backbone and a dataset, run as written: each example's
module goes into its package and its YAML into a config folder, nothing else changes, and the
contracts every registered part passes pass for it."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict

from eenn.data.sources import SOURCES
from eenn.models.backbones import BACKBONES
from eenn.policies import POLICIES, policy_class
from eenn.policies.synthetic import synthetic_predictions
from eenn.registry import import_submodules
from eenn.rundir import FitRun, TrainRun
from eenn.tasks.fit import fit_run
from eenn.tasks.train import train
from tests.contracts import checks

GUIDE = Path(__file__).resolve().parents[2] / "CONTRIBUTING.md"
BLOCK = re.compile(r"```(?:python|yaml)\n# (\S+)\n(.*?)```", re.S)


def guide_files() -> dict[str, str]:
    """The files the guide's code blocks are (a block whose first line is ``# <path>``)."""
    return {path: f"# {path}\n{body}" for path, body in BLOCK.findall(GUIDE.read_text())}


@pytest.fixture
def guide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The guide's files written out: modules into a folder that their package also searches, YAMLs
    into a config folder (returned). The registries and the imported modules are restored after."""
    conf = tmp_path / "conf"
    modules = []
    for path, text in guide_files().items():
        if path.startswith("conf/"):
            target = conf / path.removeprefix("conf/")
        else:
            package = importlib.import_module(path.rsplit("/", 1)[0].replace("/", "."))
            folder = tmp_path / "modules" / package.__name__
            monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
            target = folder / path.rsplit("/", 1)[1]
            modules.append((package, target.stem))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    for registry in (POLICIES, BACKBONES):
        monkeypatch.setattr(registry, "_factories", dict(registry._factories))
        monkeypatch.setattr(registry, "_examples", dict(registry._examples))
    yield conf
    for package, stem in modules:
        sys.modules.pop(f"{package.__name__}.{stem}", None)
        if hasattr(package, stem):
            delattr(package, stem)


def test_each_part_of_the_guide_is_one_module_and_one_yaml():
    assert sorted(guide_files()) == [
        "conf/backbone/tiny_cnn.yaml",
        "conf/data/my_digits.yaml",
        "conf/policy/max_logit.yaml",
        "eenn/models/backbones/tiny_cnn.py",
        "eenn/policies/max_logit.py",
    ]


def test_the_guides_policy(guide, val, test_preds, tmp_path):
    import_submodules("eenn.policies")  # what importing the package does
    assert "max_logit" in POLICIES
    for example in policy_class("max_logit").examples:
        checks.check_budget_is_held("max_logit", example, val)
        checks.check_the_ceiling_beats_it("max_logit", example, val)
        checks.check_simulation_equals_a_naive_loop("max_logit", example, val)
        checks.check_save_load_round_trip("max_logit", example, val, test_preds, tmp_path)
        checks.check_the_engine_agrees_with_simulation("max_logit", example, val, test_preds)
        checks.check_traits("max_logit", example, val)
    checks.check_policy_yaml("max_logit", guide)
    # eenn-fit run_dir=<run> policy=max_logit budget.fraction=0.6
    run = TrainRun(tmp_path / "train")
    for split in ("val", "test"):
        run.write_predictions(synthetic_predictions(300, seed=3, split=split))
    cfg = checks.compose_app(
        "fit", [f"run_dir={run.path}", "policy=max_logit", "budget.fraction=0.6", "wandb.enabled=false"], guide
    )
    metrics = fit_run(cfg, tmp_path / "fit")
    assert metrics["policy"] == "max_logit" and metrics["val"]["avg_cost"] <= metrics["budget"] * (1 + 1e-9)
    assert FitRun(tmp_path / "fit").policy().name == "max_logit"


def test_the_guides_backbone(guide, tmp_path, monkeypatch):
    import_submodules("eenn.models.backbones")
    assert "tiny_cnn" in BACKBONES
    checks.check_backbone("tiny_cnn")
    checks.check_backbone_yaml("tiny_cnn", guide)
    # eenn-train backbone=tiny_cnn exits=stages (a few batches)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = checks.compose_app("train", ["backbone=tiny_cnn", "exits=stages", "debug=fast"], guide)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    assert train(cfg)["exit_names"] == ["block1", "block2", "final"]


def test_the_guides_dataset(guide, tmp_path):
    src = SOURCES.build("digits")  # arrays as a user would save them
    np.savez(
        tmp_path / "my_digits.npz",
        x_train=src.x_train.numpy(),
        y_train=src.y_train.numpy(),
        x_test=src.x_test.numpy(),
        y_test=src.y_test.numpy(),
    )
    overrides = [f"paths.data_dir={tmp_path}"]
    checks.check_data_yaml("my_digits", overrides, guide)
    checks.check_the_stand_in_has_the_declared_form("my_digits", overrides, guide)
    checks.check_the_declared_form_is_the_real_one("my_digits", overrides, guide)
