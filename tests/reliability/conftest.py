"""The finished runs the reliability tests point the apps at, made once per session (tests copy
what they hand to an app)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import initialize_config_dir

from eenn.cli.common import conf_dir
from eenn.tasks.fit import fit_run
from eenn.tasks.pipeline import run_pipeline
from eenn.tasks.train import train
from tests.reliability.workspace import TRAIN, compose_run


@pytest.fixture(scope="session")
def made(tmp_path_factory) -> dict[str, Path]:
    """A finished stage-1 run and a sweep of two fits of it (maxprob, deex)."""
    root = tmp_path_factory.mktemp("made")
    train(compose_run("train", TRAIN, root / "run"))
    for job, overrides in (("0_maxprob", ["policy=maxprob"]), ("1_deex", ["policy=deex", "policy.p_tar=0.8"])):
        fit_run(
            compose_run("fit", [f"run_dir={root / 'run'}", *overrides, "wandb.mode=disabled"], root / "sweep" / job),
            root / "sweep" / job,
        )
    return {"R": root / "run", "S": root / "sweep"}


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory) -> Path:
    """A finished tiny pipeline: stage 1, maxprob at two budgets, the comparison."""
    out = tmp_path_factory.mktemp("pipe") / "demo"
    cfg = compose_run(
        "pipeline", [*TRAIN, "pipeline.policies=[maxprob]", "pipeline.num_budgets=2", "wandb.mode=disabled"], out
    )
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):  # the pipeline composes its fits
        run_pipeline(cfg)
    return out


@pytest.fixture(scope="session")
def exported(made, tmp_path_factory) -> Path:
    """A finished eenn-export of the maxprob fit in ``made`` (no baseline graph)."""
    from eenn.tasks.export import export

    out = tmp_path_factory.mktemp("export") / "bundle_run"
    export(
        compose_run("export", [f"policy_dir={made['S'] / '0_maxprob'}", "baseline=false", "check.batch_size=8"], out),
        out,
    )
    return out
