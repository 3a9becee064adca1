"""``eenn-pipeline -m ... seed=0,1``: a sweep of whole pipelines, as the README's seeded comparison
runs it (subprocesses: the sweep's job dirs are named by their overrides, = and , included)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eenn.rundir import FitRun, PipelineRun, fit_runs
from eenn.utils.overrides import override

BIN = Path(sys.executable).parent


def _run(app: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "EENN_ROOT": str(cwd)}
    return subprocess.run(
        [str(BIN / f"eenn-{app}"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_a_sweep_of_pipelines_fits_and_compares_every_job(tmp_path):
    res = _run(
        "pipeline",
        [
            "-m",
            "data=digits",
            "backbone=resnet20",
            "training=joint",
            "trainer.max_epochs=2",
            "seed=0,1",
            "pipeline.policies=[maxprob]",
            "pipeline.num_budgets=3",
            "pipeline.name=st_joint",
            "logger=csv",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "pipeline" / "multirun").iterdir()
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir())
    assert [j.name[:2] for j in jobs] == ["0_", "1_"] and all("seed=" in j.name and "," in j.name for j in jobs)
    for job in jobs:
        pipe = PipelineRun(job)
        fits = sorted(d.name for d in pipe.fit_dir.iterdir())
        assert len(fits) == 3 and all(FitRun(pipe.fit_dir / f).finished() for f in fits), fits
        assert len(pipe.results()) == 3 and pipe.compare.finished()
    assert len(fit_runs(sweep)) == 6
    res = _run(
        "compare",
        [override("sweeps", [sweep]), override("hydra.run.dir", tmp_path / "cmp"), "wandb.mode=disabled"],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "results.csv")))
    assert len(rows) == 6 and {r["model"].split(",seed=")[1][0] for r in rows} == {"0", "1"}


@pytest.mark.slow
def test_the_readme_seeded_comparison_two_trainings_three_seeds_one_compare(tmp_path):
    res = _run(
        "pipeline",
        [
            "-m",
            "data=digits",
            "training=joint,bilevel",
            "seed=0,1,2",
            "trainer.max_epochs=2",
            "pipeline.policies=[maxprob]",
            "pipeline.num_budgets=3",
            "logger=csv",
            "wandb.mode=disabled",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "pipeline" / "multirun").iterdir()
    res = _run(
        "compare",
        [
            override("sweeps", [sweep]),
            "compare.baseline=joint",
            override("hydra.run.dir", tmp_path / "cmp"),
            "wandb.mode=disabled",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    groups = list(csv.DictReader(open(tmp_path / "cmp" / "results_by_group.csv")))
    assert {g["group"] for g in groups} == {"joint", "bilevel"} and {g["n"] for g in groups} == {"3"}
    bilevel = [g for g in groups if g["group"] == "bilevel"]
    assert len(bilevel) == 3 and all(g["baseline"] == "joint" and g["diff_n"] == "3" and g["verdict"] for g in bilevel)
    assert (tmp_path / "cmp" / "seed_groups_flops.png").is_file()
    assert "paired difference" in (tmp_path / "cmp" / "report.html").read_text()
