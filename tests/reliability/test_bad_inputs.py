"""The bad inputs of issue 18, typed as a hurried user types them into the five apps: each ends
with exit code 2 and one sentence (no traceback), and leaves every file of the finished run or
sweep it was pointed at byte for byte as it was, with no half-made dir beside it.

The apps run in-process (their console-script ``main``, with ``sys.argv``) against copies of one
tiny finished run, its fits and a tiny pipeline (made once per session: conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from eenn.cli.common import conf_dir
from eenn.policies import build_policy
from eenn.policies.synthetic import synthetic_predictions
from eenn.tasks.fit import fit_run
from tests.reliability.workspace import TRAIN, assert_one_sentence, compose_run, run_app, snapshot


# --------------------------------------------------------------------- tampered input files
def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def _policy_file(ws: Path, job: str, edit: Callable[[dict[str, torch.Tensor], dict[str, str]], None]) -> str:
    tensors, meta = _tensors(ws / "S" / job / "policy.safetensors")
    edit(tensors, meta)
    path = ws / "tampered_policy.safetensors"
    save_file(tensors, str(path), meta)
    return str(path)


def _predictions_file(ws: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, str]], None]) -> str:
    tensors, meta = _tensors(ws / "R" / "predictions" / "val.safetensors")
    edit(tensors, meta)
    path = ws / "tampered_val.safetensors"
    save_file(tensors, str(path), meta)
    return str(path)


def _set(key: str, value: Any) -> Callable[[dict, dict], None]:
    return lambda tensors, meta: tensors.__setitem__(key, value(tensors[key]) if callable(value) else value)


def _hparams(**kw: Any) -> Callable[[dict, dict], None]:
    return lambda tensors, meta: meta.__setitem__("hparams", json.dumps({**json.loads(meta["hparams"]), **kw}))


def _checkpoint(ws: Path, content: Callable[[bytes], bytes]) -> None:
    best = ws / "R" / "checkpoints" / "best.ckpt"
    best.write_bytes(content(best.read_bytes()))


def _c5_policy(ws: Path) -> str:
    path = ws / "c5.safetensors"
    preds = synthetic_predictions(60, num_classes=5, seed=0)
    build_policy("maxprob").fit(preds, float(preds.costs[-1]), preds.cost_unit).save(path)
    return str(path)


def _not_a_fit(ws: Path) -> None:
    (ws / "X").mkdir()
    (ws / "X" / "metrics.json").write_text('{"accuracy": 0.5}')


INFER = ["run_dir={R}", "hydra.run.dir={N}", "backbone_baseline=false", "batch_size=256"]

# (case, app, args, fragments of the message, prepare(ws) -> extra placeholders); {R} a finished
# stage-1 run, {S} a sweep of fits of it, {F} one fit, {P} a finished pipeline, {N} a new dir
CASES: list[tuple[str, str, list[str], list[str], Callable[[Path], Any] | None]] = [
    (
        "1 train into a finished run",
        "train",
        ["debug=fast", "hydra.run.dir={R}"],
        ["run dir '{R}' holds a finished eenn-train run", "resume=<run dir>", "force=true"],
        None,
    ),
    (
        "2 fit into a stage-1 run",
        "fit",
        ["run_dir={R}", "hydra.run.dir={R}"],
        ["run dir '{R}' holds an eenn-train run", "never writes into it"],
        None,
    ),
    (
        "2 fit into a finished fit",
        "fit",
        ["run_dir={R}", "policy=entropy", "hydra.run.dir={F}"],
        ["run dir '{F}' holds a finished eenn-fit run", "force=true"],
        None,
    ),
    (
        "2 compare into a stage-1 run",
        "compare",
        ["sweeps=[{S}]", "hydra.run.dir={R}"],
        ["run dir '{R}' holds an eenn-train run"],
        None,
    ),
    (
        "2 infer into a fit",
        "infer",
        ["run_dir={R}", "policy_dir={F}", "hydra.run.dir={F}"],
        ["run dir '{F}' holds an eenn-fit run"],
        None,
    ),
    (
        "4 pipeline re-run with another stage 1",
        "pipeline",
        ["data=random", "backbone=resnet32", "hydra.run.dir={P}"],
        ["pipeline dir '{P}' was made with another config (backbone.depth: 20 -> 32", "force=true"],
        None,
    ),
    (
        "4 pipeline with an unknown policy",
        "pipeline",
        ["pipeline.policies=[nosuch]", "hydra.run.dir={N}"],
        ["'nosuch' is not a known exit policy"],
        None,
    ),
    (
        "4 pipeline re-run with an unknown policy",
        "pipeline",
        [*TRAIN, "pipeline.policies=[nosuch]", "hydra.run.dir={P}"],
        ["'nosuch' is not a known exit policy"],
        None,
    ),
    (
        "5 train forever",
        "train",
        ["trainer.max_epochs=-1", "hydra.run.dir={N}"],
        ["trainer.max_epochs must be an integer >= 1, got -1"],
        None,
    ),
    (
        "5 train no epoch",
        "train",
        ["trainer.max_epochs=0", "hydra.run.dir={N}"],
        ["trainer.max_epochs must be an integer >= 1, got 0"],
        None,
    ),
    (
        "6 val_size above 1",
        "train",
        ["data.val_size=1.5", "hydra.run.dir={N}"],
        ["data.val_size must be a fraction in (0, 1) or a whole number of samples, got 1.5"],
        None,
    ),
    (
        "7 NaN thresholds",
        "infer",
        [*INFER, "policy_file={X}"],
        ["'thresholds' holds NaN"],
        lambda ws: _policy_file(ws, "0_maxprob", _set("thresholds", lambda t: torch.full_like(t, float("nan")))),
    ),
    (
        "7 seven thresholds for 3 exits",
        "infer",
        [*INFER, "policy_file={X}"],
        ["'thresholds' has shape (7,), expected (3,)"],
        lambda ws: _policy_file(ws, "0_maxprob", _set("thresholds", torch.zeros(7))),
    ),
    (
        "7 deex p_d=7 in the hparams",
        "infer",
        [*INFER, "policy_file={X}"],
        ["policy.p_d must be a probability in [0, 1] or null, got 7.0"],
        lambda ws: _policy_file(ws, "1_deex", _hparams(p_d=7.0)),
    ),
    (
        "7 deex fitted p_d=7",
        "infer",
        [*INFER, "policy_file={X}"],
        ["its p_d is 7, expected a probability"],
        lambda ws: _policy_file(ws, "1_deex", _set("p_d", torch.tensor([7.0], dtype=torch.float64))),
    ),
    (
        "9 a + key nobody reads",
        "fit",
        ["run_dir={R}", "+budgt.fraction=0.9", "hydra.run.dir={N}"],
        ["+budgt.fraction: eenn-fit reads no key 'budgt.fraction' (did you mean budget.fraction?)"],
        None,
    ),
    (
        "10 pipeline budgets 0 and -1",
        "pipeline",
        ["pipeline.budgets=[0,-1]", "hydra.run.dir={N}"],
        ["pipeline.budgets must be a finite positive number, got 0"],
        None,
    ),
    (
        "10 pipeline policy override lr=-1",
        "pipeline",
        ["+pipeline.policy_overrides.eenet.lr=-1", "hydra.run.dir={N}"],
        ["pipeline.policy_overrides.eenet: policy.lr must be a positive number, got -1"],
        None,
    ),
    (
        "11 fractional float labels",
        "fit",
        ["predictions.val={X}", "predictions.test={R}/predictions/test.safetensors", "hydra.run.dir={N}"],
        ["has torch.float32 labels, expected int64"],
        lambda ws: _predictions_file(ws, _set("labels", lambda y: y.float() + 0.7)),
    ),
    (
        "11 format 99",
        "fit",
        ["predictions.val={X}", "predictions.test={R}/predictions/test.safetensors", "hydra.run.dir={N}"],
        ["has format 'eenn.predictions/99', expected 'eenn.predictions/1'"],
        lambda ws: _predictions_file(ws, lambda t, m: m.__setitem__("format", "eenn.predictions/99")),
    ),
    (
        "11 no format",
        "fit",
        ["predictions.val={X}", "predictions.test={R}/predictions/test.safetensors", "hydra.run.dir={N}"],
        ["has format None, expected 'eenn.predictions/1'"],
        lambda ws: _predictions_file(ws, lambda t, m: m.clear()),
    ),
    ("12 no early exit", "train", ["exits.at=[]", "hydra.run.dir={N}"], ["exits.at is empty"], None),
    (
        "13 truncated best.ckpt",
        "infer",
        [*INFER, "policy_dir={F}"],
        ["best.ckpt' is not a readable checkpoint"],
        lambda ws: _checkpoint(ws, lambda b: b[: len(b) // 2]),
    ),
    (
        "13 empty best.ckpt",
        "infer",
        [*INFER, "policy_dir={F}"],
        ["best.ckpt' is not a readable checkpoint"],
        lambda ws: _checkpoint(ws, lambda b: b""),
    ),
    (
        "13 best.ckpt not a checkpoint",
        "infer",
        [*INFER, "policy_dir={F}"],
        ["best.ckpt' is not a readable checkpoint"],
        lambda ws: _checkpoint(ws, lambda b: b"not a checkpoint\n"),
    ),
    (
        "14 a policy of 5 classes",
        "infer",
        [*INFER, "policy_file={X}"],
        ["was fitted on 3 exits and 5 classes; run_dir's network has 3 and 10"],
        _c5_policy,
    ),
    (
        "15 a policy tensor removed",
        "infer",
        [*INFER, "policy_file={X}"],
        ["lacks the tensor 'thresholds'"],
        lambda ws: _policy_file(ws, "0_maxprob", lambda t, m: t.pop("thresholds")),
    ),
    (
        "15 a policy tensor reshaped",
        "infer",
        [*INFER, "policy_file={X}"],
        ["'thresholds' has shape (3, 1)"],
        lambda ws: _policy_file(ws, "0_maxprob", _set("thresholds", lambda t: t[:, None].contiguous())),
    ),
    (
        "16 compare on an unrelated metrics.json",
        "compare",
        ["sweeps=[{X}]", "hydra.run.dir={N}"],
        ["is not an eenn-fit result"],
        lambda ws: _not_a_fit(ws) or str(ws / "X"),
    ),
    (
        "17 max_epochs=abc",
        "train",
        ["trainer.max_epochs=abc", "hydra.run.dir={N}"],
        ["trainer.max_epochs must be an integer >= 1, got 'abc'"],
        None,
    ),
    (
        "17 batch_size=0",
        "train",
        ["data.batch_size=0", "hydra.run.dir={N}"],
        ["data.batch_size must be an integer >= 1, got 0"],
        None,
    ),
    ("17 seed=abc", "train", ["seed=abc", "hydra.run.dir={N}"], ["seed must be an integer >= 0, got 'abc'"], None),
    (
        "17 policy.seed=abc",
        "fit",
        ["run_dir={R}", "policy=eenet", "policy.seed=abc", "hydra.run.dir={N}"],
        ["policy.seed must be an integer >= 0, got 'abc'"],
        None,
    ),
    (
        "17 a misspelled trainer key",
        "train",
        ["+trainer.max_epoch=1", "hydra.run.dir={N}"],
        ["trainer.max_epoch: lightning.pytorch.Trainer takes no option 'max_epoch'"],
        None,
    ),
    (
        "18 a run dir under a regular file",
        "fit",
        ["run_dir={R}", "hydra.run.dir={X}/run"],
        ["cannot be written"],
        lambda ws: (ws / "a_file").write_text("") or str(ws / "a_file"),
    ),
    (
        "18 policy.safetensors is a directory",
        "fit",
        ["run_dir={R}", "hydra.run.dir={X}"],
        ["holds files of no eenn run (policy.safetensors)"],
        lambda ws: (ws / "X" / "policy.safetensors").mkdir(parents=True) or str(ws / "X"),
    ),
    (
        "19 a sweep into an earlier sweep's dir",
        "fit",
        ["-m", "run_dir={R}", "budget.fraction=0.5,0.6", "hydra.sweep.dir={S}"],
        ["sweep dir '{S}' holds 2 jobs of an earlier sweep", "force=true"],
        None,
    ),
    (
        "20 too few thresholds",
        "fit",
        ["run_dir={R}", "policy.thresholds=[0.5]", "hydra.run.dir={N}"],
        ["policy.thresholds needs 2 values"],
        None,
    ),
    (
        "20 static exit 5",
        "fit",
        ["run_dir={R}", "policy=static", "policy.exit=5", "hydra.run.dir={N}"],
        ["policy.exit=5 is out of range for 3 exits"],
        None,
    ),
    (
        "20 static exit -4",
        "fit",
        ["run_dir={R}", "policy=static", "policy.exit=-4", "hydra.run.dir={N}"],
        ["policy.exit=-4 is out of range for 3 exits"],
        None,
    ),
    (
        "20 lr=nan",
        "train",
        ["training.optimizer.lr=nan", "hydra.run.dir={N}"],
        ["training.optimizer.lr must be a finite number, got nan"],
        None,
    ),
    (
        "21 a negative latency table",
        "fit",
        [
            "predictions.val={X}",
            "predictions.test={R}/predictions/test.safetensors",
            "cost=latency",
            "hydra.run.dir={N}",
        ],
        ["tampered_val.safetensors': cost_table.latency_ms must be finite and non-negative"],
        lambda ws: _predictions_file(
            ws,
            lambda t, m: t.__setitem__("cost_table.latency_ms", torch.tensor([-0.319, 0.5, 1.0], dtype=torch.float64)),
        ),
    ),
    ("23 an unknown key", "train", ["nosuchkey=1", "hydra.run.dir={N}"], ["Could not override 'nosuchkey'"], None),
    (
        "23 a misspelled group option",
        "train",
        ["backbone=resnet1000", "hydra.run.dir={N}"],
        ["Could not find 'backbone/resnet1000'", "resnet56"],
        None,
    ),
]


@pytest.mark.parametrize("case, app, args, fragments, prepare", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_sentence_and_changes_nothing(
    case, app, args, fragments, prepare, made, request, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("EENN_ROOT", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    ws = tmp_path / "ws"
    shutil.copytree(made["R"], ws / "R")
    shutil.copytree(made["S"], ws / "S")
    places = {"R": ws / "R", "S": ws / "S", "F": ws / "S" / "0_maxprob", "N": ws / "new"}
    if any("{P}" in a for a in args):
        shutil.copytree(request.getfixturevalue("pipeline_dir"), ws / "P")
        places["P"] = ws / "P"
    if prepare is not None:
        places["X"] = prepare(ws)
    before = snapshot(ws)
    code, out, err = run_app(app, [a.format(**places) for a in args], capsys)
    assert_one_sentence(code, out, err, 2, *(f.format(**places) for f in fragments))
    assert snapshot(ws) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only dirs")
def test_a_read_only_run_dir_is_refused(made, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EENN_ROOT", str(tmp_path))
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        code, out, err = run_app("fit", [f"run_dir={made['R']}", f"hydra.run.dir={tmp_path / 'ro'}"], capsys)
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert_one_sentence(code, out, err, 2, "cannot be written")


# --------------------------------------------------------------------- what a user may still do
def test_force_overwrites_a_finished_fit_and_leaves_nothing_of_the_old_one(made, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EENN_ROOT", str(tmp_path))
    fit = tmp_path / "fit"
    shutil.copytree(made["S"] / "0_maxprob", fit)
    (fit / "stale.txt").write_text("from the old run")
    code, _, err = run_app(
        "fit",
        [f"run_dir={made['R']}", "policy=entropy", f"hydra.run.dir={fit}", "force=true", "wandb.mode=disabled"],
        capsys,
    )
    assert code == 0, err
    assert json.loads((fit / "metrics.json").read_text())["policy"] == "entropy"
    assert not (fit / "stale.txt").exists()
    assert "policy=entropy" in (fit / ".hydra" / "overrides.yaml").read_text()


def test_an_interrupt_is_one_line_and_exit_130(made, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EENN_ROOT", str(tmp_path))

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("eenn.tasks.fit.fit_run", interrupted)
    code, out, err = run_app(
        "fit",
        ["-m", f"run_dir={made['R']}", "budget.fraction=0.5,0.6", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        capsys,
    )
    assert_one_sentence(code, out, err, 130, "interrupted")


@pytest.mark.parametrize("overrides", [["policy.thresholds=[1.5,0.9]"], ["policy=patience", "policy.patience=1000"]])
def test_a_policy_fixed_by_its_config_warns_when_it_spends_more_than_the_budget(overrides, made, tmp_path):
    metrics = fit_run(
        compose_run(
            "fit", [f"run_dir={made['R']}", "budget.fraction=0.5", "wandb.mode=disabled", *overrides], tmp_path / "fit"
        ),
        tmp_path / "fit",
    )
    assert metrics["val"]["avg_cost"] > metrics["budget"]
    assert any("exceeds the budget" in w for w in metrics["warnings"])


def test_a_pipeline_whose_fits_fail_exits_1_and_keeps_its_finished_results(pipeline_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EENN_ROOT", str(tmp_path))
    pipe = tmp_path / "P"
    shutil.copytree(pipeline_dir, pipe)
    before = {k: v for k, v in snapshot(pipe).items() if k.startswith(("train", "fit"))}

    def failing(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a fit that crashed")

    monkeypatch.setattr("eenn.tasks.pipeline.fit_run", failing)
    code, _, err = run_app(
        "pipeline",
        [
            *TRAIN,
            "pipeline.policies=[maxprob,entropy]",
            "pipeline.num_budgets=2",
            "wandb.mode=disabled",
            f"hydra.run.dir={pipe}",
        ],
        capsys,
    )
    assert code == 1 and "error: 2 fit(s) of the pipeline failed" in err, err
    after = snapshot(pipe)
    assert all(after[k] == v for k, v in before.items())  # the earlier stage 1 and fits are untouched
    failed = [p.parent.name for p in (pipe / "fit").glob("*/error.json")]
    assert len(failed) == 2 and all(name.startswith("entropy_") for name in failed)


def test_compare_lists_a_truncated_job_and_takes_one_sweep_without_brackets(made, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EENN_ROOT", str(tmp_path))
    sweep = tmp_path / "sweep"
    shutil.copytree(made["S"], sweep)
    metrics = sweep / "1_deex" / "metrics.json"
    metrics.write_text(metrics.read_text()[:40])
    code, _, err = run_app(
        "compare", [f"sweeps={sweep}", f"hydra.run.dir={tmp_path / 'cmp'}", "wandb.mode=disabled"], capsys
    )
    assert code == 0, err
    report = (tmp_path / "cmp" / "report.html").read_text()
    assert "1_deex" in report and "not readable JSON" in report


def test_a_second_writer_is_refused_and_the_first_completes(made, tmp_path, monkeypatch, capsys):
    """Two eenn-fit jobs into one run dir: while the first (in this process) fits, a second
    (a real eenn-fit process) is refused by the lock; the first's results are whole."""
    monkeypatch.setenv("EENN_ROOT", str(tmp_path))
    fit, second = tmp_path / "fit", {}
    import eenn.tasks.fit as fit_task

    evaluate = fit_task.evaluate

    def evaluate_while_a_second_job_starts(*args: Any, **kwargs: Any) -> Any:
        if not second:
            second["res"] = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "eenn.cli.fit",
                    f"run_dir={made['R']}",
                    "policy=maxprob",
                    "budget.fraction=0.9",
                    f"hydra.run.dir={fit}",
                    "wandb.mode=disabled",
                ],
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                capture_output=True,
                text=True,
                timeout=300,
            )
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(fit_task, "evaluate", evaluate_while_a_second_job_starts)
    code, _, err = run_app(
        "fit",
        [
            f"run_dir={made['R']}",
            "policy=entropy",
            "budget.fraction=0.5",
            f"hydra.run.dir={fit}",
            "wandb.mode=disabled",
        ],
        capsys,
    )
    assert code == 0, err
    res = second["res"]
    assert_one_sentence(res.returncode, res.stdout, res.stderr, 2, f"run dir '{fit}' is in use by another job (pid ")
    metrics = json.loads((fit / "metrics.json").read_text())
    assert metrics["policy"] == "entropy" and metrics["budget_fraction"] == 0.5
    assert "policy=entropy" in (fit / ".hydra" / "overrides.yaml").read_text()
    assert OmegaConf.load(fit / ".hydra" / "config.yaml").policy.name == "entropy"


# ------------------------------------------------------------------------------ usability
def test_pipeline_outputs_work_with_eenn_infer_from_any_directory(pipeline_dir, tmp_path, monkeypatch, capsys):
    """The pipeline's train/ and fit/* dirs are run dirs eenn-infer takes (policy_dir alone finds
    its run), and the saved configs hold absolute paths: infer runs from another directory."""
    monkeypatch.setenv("EENN_ROOT", str(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    saved = OmegaConf.load(pipeline_dir / "train" / ".hydra" / "config.yaml")
    assert Path(saved.data.root).is_absolute() and Path(saved.paths.output_dir) == pipeline_dir / "train"
    (job,) = [d for d in (pipeline_dir / "fit").iterdir() if d.name.startswith("maxprob_1")]
    for i, args in enumerate([[f"run_dir={pipeline_dir / 'train'}", f"policy_dir={job}"], [f"policy_dir={job}"]]):
        out = tmp_path / f"infer{i}"
        code, _, err = run_app(
            "infer", [*args, f"hydra.run.dir={out}", "backbone_baseline=false", "batch_size=256"], capsys
        )
        assert code == 0, err
        assert json.loads((out / "infer.json").read_text())
    assert not any(elsewhere.iterdir())


def test_the_pipeline_comment_on_policy_overrides_is_a_form_hydra_takes():
    text = (Path(conf_dir()) / "pipeline.yaml").read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("  policy_overrides:")]
    example = line.split("e.g. ", 1)[1].strip()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("pipeline", overrides=[example])
    assert OmegaConf.to_container(cfg.pipeline.policy_overrides) == {"eenet": {"max_epochs": 300}}
