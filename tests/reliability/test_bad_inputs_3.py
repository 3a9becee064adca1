"""The bad inputs of issue 28 ("Reliability, third round"), typed as a user types them: each ends
with exit code 2 (130 for Ctrl-C), at most three lines and no traceback, and leaves every finished
run of the workspace byte for byte as it was, with no half-made dir beside it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.workspace import TRAIN, assert_one_sentence, run_app, snapshot


def _made_by_the_cli(ws: Path) -> str:
    """The stage-1 run as eenn-train leaves it: with the overrides Hydra saves (the fixture's was
    made in-process)."""
    (ws / "R" / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in TRAIN))
    return str(ws / "R")


def _stopped_before_its_first_checkpoint(ws: Path) -> str:
    run = ws / "stopped"
    _made_by_the_cli(ws)
    shutil.copytree(ws / "R", run)
    for name in ("checkpoints", "predictions", "metrics.json"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    return str(run)


def _slurm_not_installed(ws: Path) -> str:
    """A PATH without srun or scontrol, also where the machine has Slurm (CI installs it in /usr/bin)."""
    bin_dir = ws / "empty_bin"
    bin_dir.mkdir()
    os.environ["PATH"] = str(bin_dir)  # restored by the test's monkeypatch
    return str(bin_dir)


def _slurm_without_a_controller(ws: Path) -> str:
    """srun and scontrol as a login node with a stopped slurmctld has them."""
    bin_dir = ws / "bin"
    bin_dir.mkdir()
    for name, script in (("srun", "exit 1"), ("scontrol", 'echo "Slurmctld(primary) at ctl is DOWN"; exit 1')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"  # restored by the test's monkeypatch
    return str(bin_dir)


def _bundle_with_state(ws: Path, state: list[str]) -> str:
    manifest = ws / "B" / "bundle" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["policy"]["state"] = state
    manifest.write_text(json.dumps(m))
    return str(ws / "B")


def _accuracy_as_text(ws: Path) -> str:
    shutil.copytree(ws / "F", ws / "Ftext")
    metrics = ws / "Ftext" / "metrics.json"
    m = json.loads(metrics.read_text())
    m["test"]["accuracy"] = "high"
    metrics.write_text(json.dumps(m))
    return str(ws / "Ftext")


def _another_run(ws: Path) -> str:
    """A stage-1 run like {R} but for its checkpoint (another training's)."""
    shutil.copytree(ws / "R", ws / "R2")
    best = ws / "R2" / "checkpoints" / "best.ckpt"
    best.write_bytes(best.read_bytes() + b"\0")
    return str(ws / "R2")


# (case, app, args, fragments of the message, prepare(ws) -> {X}); {R} a finished stage-1 run, {F}
# a finished fit of it, {B} a finished export of that fit, {N} a new dir
CASES: list[tuple[str, str, list[str], list[str], Callable[[Path], Any] | None]] = [
    # booleans are true or false
    (
        "backbone_baseline=maybe",
        "infer",
        ["policy_dir={F}", "backbone_baseline=maybe", "hydra.run.dir={N}"],
        ["backbone_baseline must be true or false, got 'maybe'"],
        None,
    ),
    (
        "edge_cloud.enabled=nope",
        "infer",
        ["policy_dir={F}", "edge_cloud.enabled=nope", "hydra.run.dir={N}"],
        ["edge_cloud.enabled must be true or false, got 'nope'"],
        None,
    ),
    (
        "a training flag set to yes",
        "train",
        [*TRAIN, "training.channels_last=yes", "hydra.run.dir={N}"],
        ["training.channels_last must be true or false, got 'yes'"],
        None,
    ),
    (
        "calibrate=1",
        "fit",
        ["run_dir={R}", "calibrate=1", "hydra.run.dir={N}"],
        ["calibrate must be true or false, got 1"],
        None,
    ),
    (
        "force swept with off",
        "fit",
        ["-m", "run_dir={R}", "force=true,off", "hydra.sweep.dir={N}"],
        ["force must be true or false, got 'off'"],
        None,
    ),
    # resume
    (
        "resume a finished run",
        "train",
        ["resume={X}"],
        ["resume='{X}': the run is finished; there is nothing to resume"],
        _made_by_the_cli,
    ),
    (
        "resume a fit",
        "train",
        ["resume={F}"],
        ["resume='{F}' is an eenn-fit run dir; resume takes an eenn-train run dir"],
        None,
    ),
    (
        "resume a run stopped before its first checkpoint",
        "train",
        ["resume={X}"],
        ["the run stopped before its first checkpoint", "add force=true to restart it"],
        _stopped_before_its_first_checkpoint,
    ),
    # checked before training starts
    (
        "lr=-0.1",
        "train",
        [*TRAIN, "training.optimizer.lr=-0.1", "hydra.run.dir={N}"],
        ["training.optimizer.lr must be a number > 0, got -0.1"],
        None,
    ),
    (
        "weight_decay=-1",
        "train",
        [*TRAIN, "training.optimizer.weight_decay=-1", "hydra.run.dir={N}"],
        ["training.optimizer.weight_decay must be a number >= 0, got -1"],
        None,
    ),
    (
        "momentum=abc",
        "train",
        [*TRAIN, "training.optimizer.momentum=abc", "hydra.run.dir={N}"],
        ["training.optimizer.momentum must be a number >= 0, got 'abc'"],
        None,
    ),
    (
        "label_smoothing=1.5",
        "train",
        [*TRAIN, "training.label_smoothing=1.5", "hydra.run.dir={N}"],
        ["training.label_smoothing must be a number in [0, 1), got 1.5"],
        None,
    ),
    (
        "mixup_alpha=-1",
        "train",
        [*TRAIN, "training.mixup_alpha=-1", "hydra.run.dir={N}"],
        ["training.mixup_alpha must be a number >= 0, got -1"],
        None,
    ),
    (
        "ema_decay=2",
        "train",
        [*TRAIN, "training=bilevel", "training.ema_decay=2", "hydra.run.dir={N}"],
        ["training.ema_decay must be a number in (0, 1) or null, got 2"],
        None,
    ),
    (
        "mixup with an odd batch",
        "train",
        [*TRAIN, "training.mixup_alpha=0.8", "data.batch_size=33", "hydra.run.dir={N}"],
        ["training.mixup_alpha/cutmix_alpha need an even data.batch_size, got 33"],
        None,
    ),
    # a fit dir where a training run is expected
    (
        "infer with a fit as run_dir",
        "infer",
        ["run_dir={F}", "policy_dir={F}", "hydra.run.dir={N}"],
        ["run_dir='{F}' is an eenn-fit run dir; run_dir takes an eenn-train run dir"],
        None,
    ),
    (
        "export with a fit as run_dir",
        "export",
        ["run_dir={F}", "policy_dir={F}", "hydra.run.dir={N}"],
        ["run_dir='{F}' is an eenn-fit run dir; run_dir takes an eenn-train run dir"],
        None,
    ),
    (
        "fit with a fit as run_dir",
        "fit",
        ["run_dir={F}", "hydra.run.dir={N}"],
        ["run_dir='{F}' is an eenn-fit run dir; run_dir takes an eenn-train run dir"],
        None,
    ),
    (
        "infer with a stage-1 run as policy_dir",
        "infer",
        ["run_dir={R}", "policy_dir={R}", "hydra.run.dir={N}"],
        ["policy_dir='{R}' is an eenn-train run dir; policy_dir takes an eenn-fit run dir"],
        None,
    ),
    # a config group set to something other than an option's name
    (
        "policy=false",
        "fit",
        ["run_dir={R}", "policy=false", "hydra.run.dir={N}"],
        ["policy is a config group: give the name of one of its options (deex, eenet", "got False"],
        None,
    ),
    (
        "policy=null",
        "fit",
        ["run_dir={R}", "policy=null", "hydra.run.dir={N}"],
        ["policy is a config group", "got None"],
        None,
    ),
    ("data=123", "train", ["data=123", "hydra.run.dir={N}"], ["data is a config group", "got 123"], None),
    (
        "export backbone=false",
        "export",
        ["policy_dir={F}", "backbone=false", "hydra.run.dir={N}"],
        ["backbone is a config group", "got False"],
        None,
    ),
    # bounded
    (
        "risk.candidates=100000000",
        "fit",
        ["run_dir={R}", "policy=risk", "risk.candidates=100000000", "hydra.run.dir={N}"],
        ["risk.candidates must be an integer in [2, 1000], got 100000000"],
        None,
    ),
    # Slurm
    (
        "Slurm not installed",
        "fit",
        ["-m", "hydra/launcher=slurm_cpu", "run_dir={R}", "budget.fraction=0.5,0.6", "hydra.sweep.dir={N}"],
        ["hydra/launcher slurm_cpu: Slurm is not installed here"],
        _slurm_not_installed,
    ),
    (
        "Slurm without a controller",
        "fit",
        ["-m", "hydra/launcher=slurm_cpu", "run_dir={R}", "budget.fraction=0.5,0.6", "hydra.sweep.dir={N}"],
        ["hydra/launcher slurm_cpu: no Slurm controller is reachable"],
        _slurm_without_a_controller,
    ),
    # what only a multirun does, without -m
    (
        "a sweep preset without -m",
        "fit",
        ["run_dir={R}", "budget=sweep5", "hydra.run.dir={N}"],
        ["the config sweeps budget.point: 0,1,2,3,4", "add -m"],
        None,
    ),
    (
        "a Slurm launcher without -m",
        "fit",
        ["run_dir={R}", "hydra/launcher=slurm_cpu", "hydra.run.dir={N}"],
        ["hydra/launcher slurm_cpu submits the jobs of a multirun to Slurm", "add -m"],
        None,
    ),
    # bundles
    (
        "a manifest whose policy.state names no output",
        "infer",
        ["runtime=onnxruntime", "bundle={X}", "hydra.run.dir={N}"],
        ["'policy.state' names 'nosuch', but segment_0.onnx has no output 'state_out_nosuch'"],
        lambda ws: _bundle_with_state(ws, ["nosuch"]),
    ),
    (
        "a bundle measured against another run",
        "infer",
        ["runtime=onnxruntime", "bundle={B}", "run_dir={X}", "hydra.run.dir={N}"],
        ["run_dir='{X}' is not the run bundle", "by its checkpoint's sha256"],
        _another_run,
    ),
    (
        "export at opset 99",
        "export",
        ["policy_dir={F}", "opset=99", "hydra.run.dir={N}"],
        ["opset must be at most", "got 99"],
        None,
    ),
    # keys that would be ignored
    (
        "risk.* with maxprob",
        "fit",
        ["run_dir={R}", "risk.epsilon=0.1", "hydra.run.dir={N}"],
        ["risk.epsilon=0.1: the risk.* keys configure policy=risk, and policy=maxprob reads none of them"],
        None,
    ),
    (
        "two budgets of one job name",
        "pipeline",
        [*TRAIN, "pipeline.budgets=[0.5,0.50004]", "hydra.run.dir={N}"],
        ["pipeline.budgets 0.5 and 0.50004 would both be the jobs <policy>_0.5000"],
        None,
    ),
    (
        "pipeline settings an experiment replaces",
        "pipeline",
        [
            "experiment=vit_cifar10_small_smoke",
            "debug=smoke",
            "pipeline.policies=[eenet]",
            "pipeline.num_budgets=2",
            "hydra.run.dir={N}",
        ],
        ["pipeline.policies=[eenet]: experiment=vit_cifar10_small_smoke brings its own stage 2"],
        None,
    ),
    (
        "a timm checkpoint that loads no weight",
        "train",
        [
            *TRAIN,
            "backbone=timm",
            "backbone.model=resnet10t",
            "exits.at=stages",
            "backbone.checkpoint={R}/predictions/val.safetensors",
            "hydra.run.dir={N}",
        ],
        ["val.safetensors' holds none of resnet10t's weights (its tensors are named"],
        None,
    ),
    (
        "compare a fit whose accuracy is text",
        "compare",
        ["sweeps=[{X}]", "wandb.enabled=false", "hydra.run.dir={N}"],
        ["metrics.json' holds no number in test.accuracy (got 'high')"],
        _accuracy_as_text,
    ),
    # a sweep refused by Hydra leaves no sweep dir
    (
        "a sweep with an unknown policy",
        "fit",
        ["-m", "run_dir={R}", "policy=nosuch,maxprob", "hydra.sweep.dir={N}"],
        ["Could not find 'policy/nosuch'"],
        None,
    ),
]


@pytest.mark.parametrize(("case", "app", "args", "fragments", "prepare"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_sentence_and_changes_nothing(
    case, app, args, fragments, prepare, made, exported, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("EENN_ROOT", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("PATH", os.environ["PATH"])  # a case may change it: restored after the test
    ws = tmp_path / "ws"
    shutil.copytree(made["R"], ws / "R")
    shutil.copytree(made["S"] / "0_maxprob", ws / "F")
    shutil.copytree(exported, ws / "B")
    places = {"R": ws / "R", "F": ws / "F", "B": ws / "B", "N": ws / "new"}
    if prepare is not None:
        places["X"] = prepare(ws)
    before = snapshot(ws)
    code, out, err = run_app(app, [a.format(**places) for a in args], capsys)
    assert_one_sentence(code, out, err, 2, *(f.format(**places) for f in fragments))
    assert snapshot(ws) == before


def test_ctrl_c_during_training_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EENN_ROOT", str(tmp_path))
    code, out, err = run_app(
        "train",
        [
            *TRAIN,
            "+callbacks.stop._target_=tests.reliability.crash.InterruptAt",
            "+callbacks.stop.epoch=0",
            "+callbacks.stop.batch=1",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capsys,
    )
    assert_one_sentence(code, out, err, 130, "interrupted")


@pytest.mark.slow
def test_a_pipeline_stopped_by_ctrl_c_in_stage_1_is_picked_up_by_its_re_run(tmp_path, monkeypatch, capsys):
    """The pipeline's docstring: a re-run after an interruption picks up where it stopped (here,
    stage 1 had saved no checkpoint: it starts afresh)."""
    monkeypatch.setenv("EENN_ROOT", str(tmp_path))
    import eenn.training.joint as joint

    step, calls = joint.JointTraining.training_step, []

    def interrupted_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not calls:
            calls.append(1)
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(joint.JointTraining, "training_step", interrupted_once)
    args = [
        *TRAIN,
        "pipeline.policies=[maxprob]",
        "pipeline.num_budgets=2",
        "wandb.enabled=false",
        f"hydra.run.dir={tmp_path / 'P'}",
    ]
    code, out, err = run_app("pipeline", args, capsys)
    assert_one_sentence(code, out, err, 130, "interrupted")
    code, _, err = run_app("pipeline", args, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "P" / "train" / "metrics.json").read_text())["epochs"] >= 0
    assert (tmp_path / "P" / "compare" / "report.html").is_file()


def test_a_ctrl_c_swallowed_in_a_del_still_stops_the_pipeline(tmp_path, monkeypatch, capsys):
    """Issue 28: Ctrl-C in stage 2 was once swallowed inside a profiler's ``__del__`` and the
    pipeline ran on to exit 0. Here the signal lands in a ``__del__`` after the first fit (Python
    prints "Exception ignored" and goes on): the next fit must not start, and the exit is 130."""
    monkeypatch.setenv("EENN_ROOT", str(tmp_path))
    import eenn.tasks.pipeline as pipeline

    fits: list[Any] = []
    real_fit = pipeline.fit_run

    class Profiler:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(10_000))  # the handler runs here, inside __del__, and its exception is dropped

    def fit_then_swallowed_interrupt(cfg: Any, path: Any) -> Any:
        fits.append(path)
        out = real_fit(cfg, path)
        Profiler()  # collected at once
        return out

    monkeypatch.setattr(pipeline, "fit_run", fit_then_swallowed_interrupt)
    args = [*TRAIN, "pipeline.policies=[maxprob]", "pipeline.num_budgets=2", f"hydra.run.dir={tmp_path / 'P'}"]
    code, out, err = run_app("pipeline", args, capsys)
    assert len(fits) == 1
    assert_one_sentence(code, out, err, 130, "interrupted")
