"""eenn-infer end to end on a tiny stage-1 run (resnet20, digits, one epoch) and a fitted policy."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from eenn.cli.common import conf_dir
from eenn.errors import EENNError
from eenn.rundir import FitRun
from eenn.tasks.fit import fit_run
from eenn.tasks.infer import infer
from eenn.tasks.train import train


def _compose(name: str, overrides: list[str], root: Path, out: Path):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir, cfg.paths.output_dir = str(root), str(out)
    return cfg


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path]:
    """(stage-1 run dir, eenn-fit policy dir); each saves its own config, as eenn-pipeline's do."""
    root = tmp_path_factory.mktemp("eenn")
    run, policy_dir = root / "train", root / "fit"
    cfg = _compose(
        "train",
        [
            "data=digits",
            "backbone=resnet20",
            "exits=stages",
            "logger=csv",
            "trainer.max_epochs=1",
            "cost.repeats=2",
            "trainer.enable_progress_bar=false",
        ],
        root,
        run,
    )
    train(cfg)
    fit_cfg = _compose(
        "fit", [f"run_dir={run}", "policy=deex", "policy.p_tar=0.8", "budget.fraction=0.8"], root, policy_dir
    )
    fit_run(fit_cfg, policy_dir)
    return run, policy_dir


def test_infer_runs_the_policy_and_reports_expected_next_to_realised(fitted, tmp_path, capsys):
    run, policy_dir = fitted
    cfg = _compose(
        "infer", [f"policy_dir={policy_dir}", "batch_size=64", "edge_cloud.repeats=2", "threads=1"], tmp_path, tmp_path
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = infer(cfg, tmp_path)  # run_dir comes from the policy dir's config
        assert out["threads"] == 1 and torch.get_num_threads() == 2  # restored: multirun jobs share a process
    finally:
        torch.set_num_threads(threads)

    assert json.loads((tmp_path / "infer.json").read_text()) == json.loads(json.dumps(out))
    assert not list(tmp_path.glob(".infer.json.*"))  # written atomically, no temporary left
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "expected" in line)
    assert "realised" in header  # the two columns side by side
    for row in (
        "Overhead est. in MACs",
        "% exit ",
        "Average MACs/input",
        "Savings per data input",
        "Speedup",
        "Worst case with overhead",
        "Edge/cloud",
    ):
        assert row in printed, row
    assert out["run_dir"] == str(run) and out["num_samples"] == 360 and out["policy"]["name"] == "deex"
    # on the CPU the engine takes every sample's offline exit: a sample could move only through a
    # score within float error of a threshold, and none lies that close here
    assert out["agreement"] == {"exit_index": 1.0, "predictions": 1.0}
    assert out["accuracy"]["realised"] == out["accuracy"]["expected"]
    for kind in ("expected", "realised"):
        r = out["cost_report"][kind]
        assert sum(e["fraction"] for e in r["exits"]) == pytest.approx(1.0)
        assert r["speedup"] == pytest.approx(r["standard"] / r["average"])
    t = out["timing"]  # the speedup as benchmarks/inference_speed.py measures it: medians of interleaved passes
    assert t["repeats"] == 3 and len(t["engine_s_passes"]) == len(t["backbone_s_passes"]) == 3
    assert t["engine_s"] == statistics.median(t["engine_s_passes"]) > 0
    assert t["backbone_s"] == statistics.median(t["backbone_s_passes"]) > 0
    assert t["realised_speedup"] == pytest.approx(t["backbone_s"] / t["engine_s"])
    assert "Measured wall-time speedup (median of 3 interleaved passes)" in printed
    ec = out["edge_cloud"]
    assert ec["partition"]["split"] == 1 and 0 <= ec["offload_ratio"] <= 1
    assert ec["offload_ratio"] == pytest.approx(r["exits"][-1]["fraction"])
    times = [c["total_time_s"] for c in ec["p_d_curve"]]
    assert times == sorted(times)

    for mode in ("rebatch", "single"):
        cfg = _compose(
            "infer",
            [
                f"run_dir={run}",
                f"policy_file={FitRun(policy_dir).policy_file}",
                f"mode={mode}",
                "edge_cloud.enabled=false",
                "backbone_baseline=false",
                "report_unit=latency_ms",
                "timing_repeats=1",
            ],
            tmp_path,
            tmp_path / mode,
        )
        again = infer(cfg, tmp_path / mode)
        assert again["timing"]["engine_s_passes"] == [again["timing"]["engine_s"]]
        assert again["timing"]["realised_speedup"] is None
        assert "Measured wall-time speedup (one pass)" in capsys.readouterr().out
        assert again["exit_fractions"]["realised"] == out["exit_fractions"]["realised"]
        assert again["accuracy"]["realised"] == out["accuracy"]["realised"]
        assert again["cost_report"]["realised"]["unit"] == "latency_ms" and again["edge_cloud"] is None


def test_a_calibrated_risk_policy_runs_in_the_engine_as_fitted(fitted, tmp_path):
    # policy=risk with calibrate=true through policy.safetensors into eenn-infer: the engine scales
    # the logits by the saved temperatures and takes the exits offline simulation took
    run, _ = fitted
    fit_dir = tmp_path / "fit"
    fit_cfg = _compose(
        "fit",
        [
            f"run_dir={run}",
            "policy=risk",
            "risk.epsilon=0.2",
            "risk.loss=disagreement",
            "calibrate=true",
            "budget.fraction=1.0",
        ],
        tmp_path,
        fit_dir,
    )
    metrics = fit_run(fit_cfg, fit_dir)
    # the temperatures fitted on a fifth of validation, the rule calibrated on the rest
    n_val, split = metrics["val"]["num_samples"], metrics["calibration"]["split"]
    assert metrics["calibration"]["temperatures"] and split["temperature_samples"] == round(0.2 * n_val)
    assert metrics["fitted"]["calibration_size"] == split["calibration_samples"] == n_val - split["temperature_samples"]
    cfg = _compose(
        "infer",
        [
            f"policy_dir={fit_dir}",
            "batch_size=64",
            "edge_cloud.enabled=false",
            "threads=1",
            "backbone_baseline=false",
            "timing_repeats=1",
        ],
        tmp_path,
        tmp_path / "infer",
    )
    out = infer(cfg, tmp_path / "infer")
    assert out["policy"]["name"] == "risk" and out["policy"]["info"]["threshold"] == metrics["fitted"]["threshold"]
    assert out["agreement"] == {"exit_index": 1.0, "predictions": 1.0}  # on the CPU, every sample (as above)
    assert out["accuracy"]["expected"] == pytest.approx(metrics["test"]["accuracy"])


def test_bad_input_is_named(fitted, tmp_path):
    run, policy_dir = fitted
    cases = [
        ([f"run_dir={run}"], "no policy"),
        ([f"run_dir={run}", f"policy_file={tmp_path}/none.safetensors"], "does not exist"),
        ([f"run_dir={tmp_path}", f"policy_dir={policy_dir}"], "is not a stage-1 run dir"),
        ([f"policy_dir={policy_dir}", "mode=fast"], "mode must be one of"),
        ([f"policy_dir={policy_dir}", "checkpoint=middle"], "checkpoint='middle'"),
        ([f"policy_dir={run}"], "policy_dir=.* is an eenn-train run dir; policy_dir takes an eenn-fit run dir"),
        ([f"policy_dir={policy_dir}", "split=train"], "split must be"),
        ([f"policy_dir={policy_dir}", "batch_size=0"], "batch_size must be"),
        ([f"policy_dir={policy_dir}", "timing_repeats=0"], "timing_repeats must be an integer >= 1, got 0"),
        ([f"policy_dir={policy_dir}", "threads=0"], "threads must be"),
        ([f"policy_dir={policy_dir}", "report_unit=joules"], "report_unit must be"),
        ([f"policy_dir={policy_dir}", "device=tpu9"], "device='tpu9'"),
        ([f"policy_dir={policy_dir}", "edge_cloud.bandwidth_mbps=0"], "edge_cloud.bandwidth_mbps must be"),
        ([f"policy_dir={policy_dir}", "edge_cloud.rtt_ms=-1"], "edge_cloud.rtt_ms must be"),
        ([f"policy_dir={policy_dir}", "edge_cloud.cloud_speedup=0"], "edge_cloud.cloud_speedup must be"),
        ([f"policy_dir={policy_dir}", "edge_cloud.split=5"], "edge_cloud.split=5"),
        ([f"policy_dir={policy_dir}", "edge_cloud.p_d_sweep=[0.5,2]"], "edge_cloud.p_d_sweep"),
        ([f"policy_dir={policy_dir}", "compile=yes"], "compile must be true or false"),
        (
            ["runtime=onnxruntime", f"bundle={tmp_path}", "compile=true"],
            "compile=true compiles the torch engine's segments",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(EENNError, match=message):
            infer(_compose("infer", overrides, tmp_path, tmp_path), tmp_path)


@pytest.mark.slow
def test_eenn_infer_multirun_writes_one_dir_per_job(fitted, tmp_path):
    run, policy_dir = fitted
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "EENN_ROOT": str(tmp_path)}
    args = [
        sys.executable,
        "-m",
        "eenn.cli.infer",
        "-m",
        f"policy_file={FitRun(policy_dir).policy_file}",
        f"run_dir={run}",
        "mode=batched,rebatch",
        "edge_cloud.repeats=2",
    ]
    res = subprocess.run(args, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    sweeps = list((tmp_path / "outputs" / "infer" / "multirun").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p.name for p in sweeps[0].iterdir() if (p / "infer.json").is_file())
    assert jobs == ["0_edge_cloud.repeats=2,mode=batched", "1_edge_cloud.repeats=2,mode=rebatch"]
    assert "Speedup" in res.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "eenn.cli.infer", f"run_dir={run}"],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and "error: no policy" in bad.stderr and "Traceback" not in bad.stderr
