"""eenn-fit's wandb runs (issue 6): one run per fit in one project, group = the stage-1 run's name,
job_type = the policy, always finished (failed fits too), files in the fit's run dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import wandb
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from eenn.cli.common import conf_dir
from eenn.errors import EENNError
from eenn.policies.synthetic import synthetic_predictions
from eenn.rundir import TrainRun
from eenn.tasks import fit as fitting
from eenn.tasks.fit import fit_run

REPO = Path(__file__).resolve().parents[2]
STAGE1 = "2025-01-02_03-04-05_a1b2c3"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A stage-1 run dir as eenn-train leaves it (predictions and metrics.json), synthetic predictions."""
    run = tmp_path / "train" / "runs" / STAGE1
    for split, n, seed in (("val", 600, 0), ("test", 800, 1)):
        preds = synthetic_predictions(n, seed=seed, split=split)
        preds.source_run = str(run)  # as eenn-train writes it
        preds.save(run / "predictions" / f"{split}.safetensors")
    (run / "metrics.json").write_text(
        json.dumps({"data": "digits", "training": "joint", "backbone": {"name": "cifar_resnet", "depth": 20}})
    )
    return run


def fit_cfg(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name="fit", overrides=list(overrides))


class _Config(dict):
    """wandb.config's update() takes allow_val_change."""

    def update(self, other: dict[str, Any], allow_val_change: bool = False) -> None:  # wandb's signature
        super().update(other)


class FakeRun:
    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs
        self.config = _Config(kwargs.get("config") or {})
        self.summary: dict[str, Any] = {}
        self.finished: list[int | None] = []

    def finish(self, exit_code: int | None = None) -> None:
        self.finished.append(exit_code)


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[FakeRun]:
    """Every wandb.init call eenn makes, as a FakeRun holding its kwargs (no wandb process starts)."""
    runs: list[FakeRun] = []

    def fake_init(**kwargs: Any) -> FakeRun:
        run = FakeRun(kwargs)
        runs.append(run)
        return run

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return runs


def test_two_policies_on_one_stage1_run_share_the_group_and_differ_in_job_type(
    run_dir: Path, tmp_path: Path, captured: list[FakeRun]
) -> None:
    outs = {p: tmp_path / "fit" / p for p in ("maxprob", "patience")}
    metrics = {
        p: fit_run(fit_cfg([f"run_dir={run_dir}", f"policy={p}", "budget.fraction=0.7"]), out)
        for p, out in outs.items()
    }

    assert len(captured) == 2
    for run, (policy, out) in zip(captured, outs.items()):
        kw = run.kwargs
        assert kw["project"] == "eenn"
        assert kw["group"] == STAGE1
        assert kw["job_type"] == policy
        assert kw["mode"] == "offline"  # WANDB_MODE wins; without it and credentials: offline too
        assert Path(kw["dir"]) == out  # wandb's files go inside the stage-2 run dir
        assert kw["name"] == f"{policy}_0.700"
        assert kw["reinit"] == "finish_previous"
        # the budget and the fitted hyper-parameters in the config ...
        assert run.config["budget_fraction"] == pytest.approx(0.7)
        assert run.config["budget"] == pytest.approx(metrics[policy]["budget"])
        assert run.config["cost_unit"] == "flops"
        assert run.config["policy"]["name"] == policy
        assert run.config["stage1"]["name"] == STAGE1 and run.config["stage1"]["data"] == "digits"
        assert run.config["fitted"] == json.loads(json.dumps(metrics[policy]["fitted"]))
        assert "hparams" in run.config
        # ... accuracies, realised costs and exit fractions in the summary ...
        for split in ("val", "test"):
            assert run.summary[f"{split}/accuracy"] == metrics[policy][split]["accuracy"]
            assert run.summary[f"{split}/avg_cost"] == metrics[policy][split]["avg_cost"]
            assert run.summary[f"{split}/exit_fractions"] == metrics[policy][split]["exit_fractions"]
            names = metrics[policy]["exit_names"]
            assert [run.summary[f"{split}/exit_fraction/{n}"] for n in names] == metrics[policy][split][
                "exit_fractions"
            ]
        # ... and finished once, successfully
        assert run.finished == [None]
    assert "patience" in captured[1].config["fitted"]  # patience's fitted value is logged


def test_a_failing_fit_still_finishes_its_run(
    run_dir: Path, tmp_path: Path, captured: list[FakeRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(fitting, "evaluate", boom)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        fit_run(fit_cfg([f"run_dir={run_dir}", "policy=entropy"]), tmp_path / "fit")
    assert [r.finished for r in captured] == [[1]]  # marked failed, and finished


def test_refused_input_starts_no_run_and_wandb_can_be_switched_off(
    run_dir: Path, tmp_path: Path, captured: list[FakeRun]
) -> None:
    with pytest.raises(EENNError, match="budget.fraction must be a finite positive number"):
        fit_run(fit_cfg([f"run_dir={run_dir}", "budget.fraction=-1"]), tmp_path / "bad")
    assert captured == [] and not (tmp_path / "bad").exists()
    with pytest.raises(EENNError, match=r"wandb.mode must be one of"):
        fit_run(fit_cfg([f"run_dir={run_dir}", "wandb.mode=sometimes"]), tmp_path / "bad")
    fit_run(fit_cfg([f"run_dir={run_dir}", "wandb.enabled=false"]), tmp_path / "off")
    assert captured == []
    fit_run(
        fit_cfg([f"run_dir={run_dir}", "wandb.group=mine", "wandb.project=p", "wandb.name=n", "wandb.tags=[a]"]),
        tmp_path / "custom",
    )
    kw = captured[0].kwargs
    assert (kw["group"], kw["project"], kw["name"], kw["tags"], kw["job_type"]) == ("mine", "p", "n", ["a"], "maxprob")


def test_the_group_follows_eenn_compare_s_model_name(run_dir: Path, tmp_path: Path, captured: list[FakeRun]) -> None:
    assert TrainRun(tmp_path / "pipeline" / "demo" / "train").name == "demo"  # a pipeline's stage-1 run
    files = [f"predictions.{s}={run_dir / 'predictions' / f'{s}.safetensors'}" for s in ("val", "test")]
    fit_run(fit_cfg(files), tmp_path / "fit")  # no run_dir: the files' source_run names the run
    assert captured[-1].kwargs["group"] == STAGE1
    anonymous = tmp_path / "elsewhere" / "my_model"
    for split in ("val", "test"):  # predictions from another tool, no source_run: their folder names it
        preds = synthetic_predictions(300, seed=2, split=split)
        preds.source_run = ""
        preds.save(anonymous / "predictions" / f"{split}.safetensors")
    files = [f"predictions.{s}={anonymous / 'predictions' / f'{s}.safetensors'}" for s in ("val", "test")]
    fit_run(fit_cfg(files), tmp_path / "fit2")
    assert captured[-1].kwargs["group"] == "my_model"


def test_real_offline_runs_are_written_in_each_fit_run_dir(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    outs = [tmp_path / "fit" / p for p in ("maxprob", "entropy")]
    for out in outs:
        fit_run(fit_cfg([f"run_dir={run_dir}", f"policy={out.name}", "budget.fraction=0.6"]), out)
    assert wandb.run is None  # finished: nothing left to log into the next job's run
    # the wandb-core service writes each run's transaction log behind finish(); its teardown (what
    # the process's exit does) waits until every record is on disk
    wandb.teardown()
    for out in outs:
        (offline,) = (out / "wandb").glob("offline-run-*")
        (records,) = offline.glob("run-*.wandb")
        data = records.read_bytes()
        assert len(data) > 0
        # the run's records carry the group and job type (protobuf keeps strings as they are)
        assert STAGE1.encode() in data and out.name.encode() in data
        assert (out / "metrics.json").is_file() and (out / "policy.safetensors").is_file()


@pytest.mark.slow
def test_a_multirun_writes_one_offline_run_per_job(run_dir: Path, tmp_path: Path) -> None:
    """The real eenn-fit -m: Hydra runs the jobs one after another in one process; each gets its own run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "EENN_ROOT": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "eenn.cli.fit",
        "-m",
        f"run_dir={run_dir}",
        "policy=maxprob,entropy",
        "budget.fraction=0.5,0.9",
    ]
    done = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (sweep,) = (tmp_path / "outputs" / "fit" / "multirun").iterdir()
    jobs = sorted(d for d in sweep.iterdir() if (d / "metrics.json").is_file())
    assert len(jobs) == 4
    for job in jobs:
        (offline,) = (job / "wandb").glob("offline-run-*")
        (records,) = offline.glob("run-*.wandb")
        data = records.read_bytes()
        policy = json.loads((job / "metrics.json").read_text())["policy"]
        assert STAGE1.encode() in data and policy.encode() in data
