"""eenn-fit: the composed app in-process on a synthetic stage-1 run dir, its bad-input errors,
and one real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from safetensors.torch import save_file

from eenn.cli.common import conf_dir
from eenn.errors import EENNError
from eenn.policies import POLICIES, ExitPolicy, policy_class
from eenn.policies.synthetic import synthetic_predictions
from eenn.predictions import FORMAT
from eenn.tasks.fit import fit_run

REPO = Path(__file__).resolve().parents[2]
KEYS = {"policy", "budget", "budget_fraction", "cost_unit", "fit_seconds", "val", "test"}
S_KEYS = {"accuracy", "avg_cost", "exit_fractions", "exit_accuracy", "confusion"}


def fit_cfg(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name="fit", overrides=list(overrides))


@pytest.mark.parametrize("policy", POLICIES.names())
def test_fit_app_writes_policy_and_metrics(policy: str, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fit"
    example = [f"policy.{k}={v}" for k, v in policy_class(policy).examples[0].items()]
    cfg = fit_cfg([f"run_dir={run_dir}", f"policy={policy}", *example, "budget.fraction=0.8"])
    metrics = fit_run(cfg, out)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert KEYS <= set(on_disk)
    assert S_KEYS <= set(on_disk["val"]) and S_KEYS <= set(on_disk["test"])
    assert on_disk["policy"] == policy
    assert on_disk["cost_unit"] == "flops"
    assert on_disk["budget"] == pytest.approx(0.8e6)
    assert on_disk["budget_fraction"] == pytest.approx(0.8)
    if policy_class(policy).budgeted:
        assert on_disk["val"]["avg_cost"] <= on_disk["budget"] * (1 + 1e-9)
    loaded = ExitPolicy.load(out / "policy.safetensors")
    assert loaded.name == policy


def test_fit_app_eenet_latency_and_explicit_files(run_dir: Path, tmp_path: Path) -> None:
    cfg = fit_cfg(
        [
            f"predictions.val={run_dir / 'predictions' / 'val.safetensors'}",
            f"predictions.test={run_dir / 'predictions' / 'test.safetensors'}",
            "policy=eenet",
            "policy.max_epochs=30",
            "cost=latency",
            "budget.value=3.0",
        ]
    )
    metrics = fit_run(cfg, tmp_path / "fit")
    assert metrics["cost_unit"] == "latency_ms"
    assert metrics["budget"] == 3.0
    assert metrics["val"]["avg_cost"] <= 3.0 * (1 + 1e-9)


def test_fit_app_defaults_to_the_predictions_own_cost_unit(tmp_path: Path) -> None:
    # files whose only unit is latency_ms (from another tool): no cost= needed, flops is refused
    run = tmp_path / "train_run"
    for split, seed in (("val", 0), ("test", 1)):
        p = synthetic_predictions(300, seed=seed, split=split, costs=[1.0, 2.0, 4.0], head_costs=[0.1, 0.1, 0.0])
        replace(p, cost_unit="latency_ms", cost_table={}, head_cost_table={}).save(
            run / "predictions" / f"{split}.safetensors"
        )
    metrics = fit_run(fit_cfg([f"run_dir={run}", "budget.fraction=0.6"]), tmp_path / "fit")
    assert metrics["cost_unit"] == "latency_ms"
    assert metrics["budget"] == pytest.approx(0.6 * 4.0)
    with pytest.raises(
        EENNError, match="cost='flops': the predictions have no 'flops' costs; they have \\['latency_ms'\\]"
    ):
        fit_run(fit_cfg([f"run_dir={run}", "cost=flops"]), tmp_path / "flops")


def test_budgets_outside_the_reachable_range_are_clamped_with_a_warning(run_dir: Path, tmp_path: Path) -> None:
    low = fit_run(fit_cfg([f"run_dir={run_dir}", "budget.fraction=0.1"]), tmp_path / "low")
    assert low["budget"] == pytest.approx(1e6 / 3)
    assert "clamped" in low["warnings"][0]
    high = fit_run(fit_cfg([f"run_dir={run_dir}", "budget.fraction=1.5"]), tmp_path / "high")
    assert high["budget"] == pytest.approx(1e6)
    assert high["val"]["exit_fractions"][-1] == 1.0
    assert "above the full model's cost" in high["warnings"][0]
    # the first exit's own fraction, printed to 4 digits (1/3 -> 0.3333), is that exit: no warning
    edge = fit_run(fit_cfg([f"run_dir={run_dir}", "budget.fraction=0.3333"]), tmp_path / "edge")
    assert edge["budget"] == pytest.approx(1e6 / 3) and edge["warnings"] == []
    deex = fit_run(fit_cfg([f"run_dir={run_dir}", "policy=deex", "budget.fraction=0.4"]), tmp_path / "deex")
    assert deex["budget"] > 0.4e6 and "cheapest the policy can do" in deex["warnings"][0]


def _write(path: Path, preds) -> Path:
    preds.save(path)
    return path


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["budget.fraction=0"], "budget.fraction must be a finite positive number, got 0"),
        (["budget.fraction=-0.5"], "budget.fraction must be a finite positive number"),
        (["budget.fraction=abc"], "budget.fraction must be a finite positive number, got 'abc'"),
        (["budget.value=-3"], "budget.value must be a finite positive number"),
        (["policy.name=nope"], "policy.name='nope' is not a known exit policy; valid:"),
        (["cost=joules"], "cost='joules': the predictions have no 'joules' costs; they have"),
        (["policy.thresholds=[0.5]"], "policy.thresholds needs 2 values"),
        (["calibrate=yes"], "calibrate must be true or false, got 'yes'"),
        (["policy=risk", "risk.epsilon=2"], r"risk.epsilon must be a number in \(0, 1\), got 2"),
        (["policy=risk", "risk.loss=mse"], "risk.loss must be one of"),
        (
            ["policy=risk", "risk.epsilon=0.05", "budget.fraction=0.4"],
            "no candidate certified at risk.epsilon=0.05 is within the budget",
        ),
    ],
)
def test_fit_app_bad_config(overrides: list[str], match: str, run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EENNError, match=match):
        fit_run(fit_cfg([f"run_dir={run_dir}", *overrides]), tmp_path / "fit")


def test_fit_app_bad_predictions(tmp_path: Path) -> None:
    good = _write(tmp_path / "val.safetensors", synthetic_predictions(50, seed=0))
    nan = synthetic_predictions(50, seed=1)
    nan.logits[3, 1, 2] = float("nan")
    bad_nan = tmp_path / "nan.safetensors"  # Predictions.save refuses NaN: write the file by hand
    save_file({"logits": nan.logits, "labels": nan.labels, "costs": nan.costs}, str(bad_nan), {"format": FORMAT})
    four = _write(tmp_path / "four.safetensors", synthetic_predictions(50, num_exits=4, seed=2))
    cases = [
        (
            [f"predictions.val={good}", f"predictions.test={bad_nan}"],
            "logits hold NaN or Inf values in 1 of 50 samples",
        ),
        ([f"predictions.val={good}", f"predictions.test={four}"], "val has K=3 exits and C=10 classes, test has K=4"),
        ([f"predictions.val={good}"], r"no test predictions: set run_dir=<stage-1 run dir> or predictions.test=<file>"),
        ([f"run_dir={tmp_path / 'nowhere'}"], "is not a directory"),
        ([f"predictions.val={tmp_path / 'missing.safetensors'}", f"predictions.test={good}"], "does not exist"),
    ]
    for overrides, match in cases:
        with pytest.raises(EENNError, match=match):
            fit_run(fit_cfg(overrides), tmp_path / "fit")


@pytest.mark.parametrize("preset, points", [("sweep5", 5), ("sweep10", 10)])
def test_sweep_presets_sweep_from_the_first_exit_to_the_full_cost(
    preset: str, points: int, run_dir: Path, tmp_path: Path
) -> None:
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="fit", overrides=[f"budget={preset}"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params["budget.point"] == ",".join(map(str, range(points)))
    # the synthetic run's exits cost 1/3, 2/3 and 1 of the full cost: every point is reachable
    first = 1 / 3
    for i in (0, points // 2, points - 1):
        metrics = fit_run(fit_cfg([f"run_dir={run_dir}", f"budget={preset}", f"budget.point={i}"]), tmp_path / f"{i}")
        assert metrics["budget_fraction"] == pytest.approx(first + (1 - first) * i / (points - 1))
        assert metrics["budget_request"]["fraction"] == pytest.approx(metrics["budget_fraction"])
        assert metrics["warnings"] == []


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["budget=sweep5", "budget.point=5"], r"budget.point must be an integer in 0..4, got 5"),
        (["budget=sweep5", "budget.point=1.5"], r"budget.point must be an integer in 0..4, got 1.5"),
        (["budget.point=0"], r"budget.points must be an integer >= 2 with budget.point set, got None"),
        (["budget=sweep5", "budget.points=1"], r"budget.points must be an integer >= 2 with budget.point set, got 1"),
        (["budget=sweep5", "budget.point=null"], r"budget.fraction must be a finite positive number, got None"),
    ],
)
def test_bad_sweep_points_are_named(overrides: list[str], match: str, run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EENNError, match=match):
        fit_run(fit_cfg([f"run_dir={run_dir}", *overrides]), tmp_path / "fit")


@pytest.mark.slow
def test_eenn_fit_subprocess(run_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "EENN_ROOT": str(tmp_path)}
    cmd = [sys.executable, "-m", "eenn.cli.fit", f"run_dir={run_dir}", "policy=entropy", "budget.fraction=0.6"]
    run = {"cwd": REPO, "env": env, "capture_output": True, "text": True, "timeout": 300}
    done = subprocess.run(cmd, check=False, **run)
    assert done.returncode == 0, done.stderr
    (metrics,) = (tmp_path / "outputs" / "fit" / "runs").glob("*_entropy_*/metrics.json")
    assert json.loads(metrics.read_text())["budget_fraction"] == pytest.approx(0.6)
    assert (metrics.parent / "policy.safetensors").is_file()
    bad = subprocess.run([*cmd, "budget.fraction=-1"], check=False, **run)
    assert bad.returncode == 2
    assert "error: budget.fraction must be a finite positive number, got -1." in bad.stderr
    sweep_cmd = [*cmd[:3], "-m", f"run_dir={run_dir}", "policy=maxprob", "budget=sweep5"]
    sweep = subprocess.run(sweep_cmd, check=False, **run)
    assert sweep.returncode == 0, sweep.stderr
    (sweep_dir,) = (tmp_path / "outputs" / "fit" / "multirun").iterdir()
    fractions = sorted(json.loads(m.read_text())["budget_fraction"] for m in sweep_dir.glob("*/metrics.json"))
    assert fractions == pytest.approx([1 / 3, 1 / 2, 2 / 3, 5 / 6, 1.0])  # the first exit (1/3) to the full cost


def test_a_tiny_validation_split_warns_and_calibrating_on_it_is_refused(compose_cfg, tmp_path):
    from eenn.policies.synthetic import synthetic_predictions

    run = tmp_path / "tiny_run"
    synthetic_predictions(30, seed=0).save(run / "predictions" / "val.safetensors")
    synthetic_predictions(200, seed=1, split="test").save(run / "predictions" / "test.safetensors")
    metrics = fit_run(compose_cfg("fit", [f"run_dir={run}", "policy=maxprob", "wandb.mode=disabled"]), tmp_path / "f1")
    assert any("validation holds 30 samples" in w for w in metrics["warnings"])
    with pytest.raises(
        EENNError, match=r"calibrate=true would fit temperatures on 30 validation samples; they need at least 50"
    ):
        fit_run(
            compose_cfg("fit", [f"run_dir={run}", "policy=maxprob", "calibrate=true", "wandb.mode=disabled"]),
            tmp_path / "f2",
        )
    assert not (tmp_path / "f2").exists()
