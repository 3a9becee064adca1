"""A tiny pipeline run (digits, ResNet-20, every policy), made once for the comparison tests."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from eenn.cli.common import conf_dir
from eenn.tasks.pipeline import run_pipeline


def _pipeline_policies() -> list[str]:
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return list(compose("pipeline").pipeline.policies)


ALL_POLICIES = _pipeline_policies()  # what eenn-pipeline fits by default


def run_tiny_pipeline(out: Path, overrides: list[str] = ()):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(
            "pipeline",
            [
                "logger=csv",
                "trainer.max_epochs=2",
                "cost.latency=false",
                "trainer.enable_progress_bar=false",
                "pipeline.num_budgets=3",
                "+pipeline.policy_overrides.eenet.max_epochs=30",
                "wandb.mode=offline",
                *overrides,
            ],
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            cfg.paths.root_dir = str(out.parent)
        return run_pipeline(cfg)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipeline") / "tiny"
    run_tiny_pipeline(out)
    return out
