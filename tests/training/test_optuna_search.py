"""hydra/sweeper=optuna_exits: each trial is an eenn-train run scored on its validation predictions
alone; a 3-trial study on digits writes its Pareto set, and its trials are fitted and compared."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import open_dict

from eenn.errors import EENNError
from eenn.evaluation import objective as objective_module
from eenn.evaluation.objective import BUDGETS, accuracy_at_budgets, budget_auc
from eenn.predictions import Predictions
from eenn.rundir import TrainRun
from eenn.tasks.train import objective_values, train
from eenn.utils.overrides import override, quote

BIN = Path(sys.executable).parent
TINY = [
    "data=digits",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "cost.latency=false",
    "logger=csv",
    "trainer.enable_progress_bar=false",
]


def test_a_trial_scores_itself_on_validation_and_never_reads_test(compose_cfg, monkeypatch):
    read = []
    real = objective_module.evaluate
    monkeypatch.setattr(
        objective_module, "evaluate", lambda policy, preds, unit: read.append(preds.split) or real(policy, preds, unit)
    )
    cfg = compose_cfg("train", [*TINY, "hydra/sweeper=optuna_exits", "exits.at=[1,4]"])
    assert list(cfg.objective) == ["val_auc", "exit_overhead"]
    metrics = train(cfg)
    assert read and set(read) == {"val"}  # every score the objective took was on validation predictions
    run = TrainRun(cfg.paths.output_dir)
    val = run.predictions("val")
    obj = metrics["objective"]
    assert obj["val_accuracy_at_budgets"] == accuracy_at_budgets(val, "flops") and obj["budgets"] == list(BUDGETS)
    assert obj["val_auc"] == budget_auc(obj["val_accuracy_at_budgets"]) and 0 < obj["val_auc"] < 1
    costs = run.costs()
    assert (
        obj["exit_overhead"] == pytest.approx(costs.per_exit("flops")[-1] / costs.backbone["flops"] - 1)
        and obj["exit_overhead"] > 0
    )
    assert json.loads((run.path / "metrics.json").read_text())["objective"] == obj
    assert objective_values(cfg, metrics) == [obj["val_auc"], obj["exit_overhead"]]
    with open_dict(cfg):
        cfg.objective = "val_auc"
    assert objective_values(cfg, metrics) == obj["val_auc"]
    with pytest.raises(ValueError, match="validation predictions only"):
        accuracy_at_budgets(run.predictions("test"), "flops")


def test_budgets_below_the_first_exit_score_zero_and_the_auc_is_a_mean():
    assert budget_auc([0.5] * len(BUDGETS)) == pytest.approx(0.5)
    assert budget_auc([0.0, 1.0], budgets=[0.0, 1.0]) == pytest.approx(0.5)
    from eenn.policies.synthetic import synthetic_predictions

    val = synthetic_predictions(300, seed=0, split="val")
    acc = accuracy_at_budgets(val, val.cost_unit)
    first = float(val.costs[0] / val.costs[-1])
    assert [a == 0.0 for a in acc] == [b < first for b in BUDGETS]
    assert acc[-1] == pytest.approx(float(val.accuracy_per_exit()[-1]))  # the full budget: the last exit's answers


def test_an_unknown_objective_is_refused_by_name(compose_cfg):
    cfg = compose_cfg("train", [*TINY, "hydra/sweeper=optuna_exits", "objective=[val_auc,speed]"])
    with pytest.raises(EENNError, match=r"objective must name one or more of \['val_auc', 'exit_overhead'\]"):
        train(cfg)


def _run(app: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "EENN_ROOT": str(cwd)}
    return subprocess.run(
        [str(BIN / f"eenn-{app}"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1500
    )


@pytest.mark.slow
def test_a_three_trial_study_writes_its_pareto_set_and_compare_takes_its_trials(tmp_path):
    study = tmp_path / "study"
    res = _run(
        "train",
        [
            "-m",
            "hydra/sweeper=optuna_exits",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler.population_size=3",
            *TINY,
            "wandb.mode=disabled",
            override("hydra.sweep.dir", study),
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    trials = sorted(d for d in study.iterdir() if d.is_dir() and (d / "metrics.json").is_file())
    assert [d.name for d in trials] == ["trial_0", "trial_1", "trial_2"]
    drawn = [yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) for d in trials]
    assert all(any(o.startswith("exits.at=[") for o in overrides) for overrides in drawn)
    scores = [json.loads((d / "metrics.json").read_text())["objective"] for d in trials]
    pareto = yaml.safe_load((study / "optimization_results.yaml").read_text())
    assert pareto["name"] == "optuna" and 1 <= len(pareto["solutions"]) <= 3
    trial_values = [[s["val_auc"], s["exit_overhead"]] for s in scores]
    for solution in pareto["solutions"]:  # each Pareto point is a trial's own scores, and its parameters
        assert any(solution["values"] == pytest.approx(v) for v in trial_values)
        assert set(solution["params"]) == {"exits.at", "training.loss_weights", "training.kl_alpha"}
    # the trials, fitted and compared as any stage-1 runs are
    fits = tmp_path / "fits"
    res = _run(
        "fit",
        [
            "-m",
            "run_dir=" + ",".join(quote(str(d)) for d in trials),
            "policy=maxprob",
            "budget.fraction=0.6,0.9",
            "wandb.mode=disabled",
            override("hydra.sweep.dir", fits),
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run(
        "compare",
        [override("sweeps", [fits]), override("hydra.run.dir", tmp_path / "cmp"), "wandb.mode=disabled"],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "results.csv")))
    assert len(rows) == 6 and len({r["model"] for r in rows}) == 3
    assert "Plotly.newPlot" in (tmp_path / "cmp" / "report.html").read_text()
    assert Predictions.load(trials[0] / "predictions" / "test.safetensors").split == "test"  # written, for the compare
