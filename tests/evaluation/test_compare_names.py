"""Two stage-1 runs with one dir name (``a/base`` and ``b/base``) stay two models in a comparison."""

from __future__ import annotations

import csv

from eenn.tasks.compare import compare
from eenn.tasks.fit import fit_run
from eenn.tasks.train import train
from tests.reliability.workspace import TRAIN, compose_run


def test_two_runs_named_alike_are_two_models(tmp_path):
    for parent, seed in (("a", 0), ("b", 1)):
        run = tmp_path / parent / "base"
        train(compose_run("train", [*TRAIN, f"seed={seed}"], run))
        fit_dir = tmp_path / "fits" / parent
        fit_run(compose_run("fit", [f"run_dir={run}", "policy=maxprob", "wandb.mode=disabled"], fit_dir), fit_dir)
    comp = compare([tmp_path / "fits"], [], tmp_path / "cmp")
    assert sorted(m.name for m in comp.models.values()) == ["a/base", "b/base"]
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "results.csv")))
    assert sorted(r["model"] for r in rows) == ["a/base", "b/base"]
    # they differ in their seed alone: one group of two seeds
    assert {r["group"] for r in rows} == {"joint"} and {r["group_n"] for r in rows} == {"2"}
