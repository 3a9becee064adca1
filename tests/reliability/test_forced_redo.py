"""``force=true`` never loses a finished run (issue 28): a forced redo keeps the old run aside in
its dir until the new run has finished, so a refusal, a crash or a SIGKILL at any point leaves
either the old run, byte for byte, or the finished new one, never half of each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from eenn.rundir import LOCK_FILE, REPLACE_DIRS, FitRun
from tests.reliability.workspace import TRAIN, assert_one_sentence, run_app, snapshot

REPO = Path(__file__).resolve().parents[2]


def _truncated_checkpoint(ws: Path) -> str:
    cut = ws / "cut.ckpt"
    best = ws / "R" / "checkpoints" / "best.ckpt"
    cut.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    return str(cut)


# (case, app, args, fragments of the message); {R} a finished stage-1 run, {F} a finished fit of
# it, {B} a finished export of that fit, {P} a finished pipeline, {O} an oracle_budget fit, {X} what
# the case prepares
CASES: list[tuple[str, str, list[str], list[str]]] = [
    ("export of an oracle", "export", ["policy_dir={O}", "force=true", "hydra.run.dir={B}"], ["oracle"]),
    (
        "risk certifies nothing",
        "fit",
        ["run_dir={R}", "policy=risk", "budget.fraction=0.3", "force=true", "wandb.enabled=false", "hydra.run.dir={F}"],
        ["no candidate certified"],
    ),
    (
        "export of a truncated checkpoint",
        "export",
        ["policy_dir={F}", "checkpoint={X}", "force=true", "hydra.run.dir={B}"],
        ["is not a readable checkpoint"],
    ),
    (
        "train with an exit past the backbone",
        "train",
        [*TRAIN, "force=true", "exits.at=[layer9]", "hydra.run.dir={R}"],
        ["exits.at"],
    ),
    (
        "pipeline whose stage 1 is refused",
        "pipeline",
        [*TRAIN, "force=true", "exits.at=[layer9]", "wandb.enabled=false", "hydra.run.dir={P}"],
        ["exits.at"],
    ),
    (
        "force=no",
        "fit",
        ["run_dir={R}", "policy=entropy", "force=no", "hydra.run.dir={F}"],
        ["force must be true or false, got 'no'"],
    ),
    ("force=off", "train", [*TRAIN, "force=off", "hydra.run.dir={R}"], ["force must be true or false, got 'off'"]),
]


@pytest.mark.parametrize(("case", "app", "args", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_a_forced_redo_that_is_refused_leaves_every_finished_run_as_it_was(
    case, app, args, fragments, made, exported, request, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("EENN_ROOT", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    ws = tmp_path / "ws"
    shutil.copytree(made["R"], ws / "R")
    shutil.copytree(made["S"] / "0_maxprob", ws / "F")
    shutil.copytree(exported, ws / "B")
    places = {"R": ws / "R", "F": ws / "F", "B": ws / "B"}
    if any("{P}" in a for a in args):
        shutil.copytree(request.getfixturevalue("pipeline_dir"), ws / "P")
        places["P"] = ws / "P"
    if any("{O}" in a for a in args):
        code, _, err = run_app(
            "fit", [f"run_dir={ws / 'R'}", "policy=oracle_budget", f"hydra.run.dir={ws / 'O'}"], capsys
        )
        assert code == 0, err
        places["O"] = ws / "O"
    if any("{X}" in a for a in args):
        places["X"] = _truncated_checkpoint(ws)
    before = snapshot(ws)
    code, out, err = run_app(app, [a.format(**places) for a in args], capsys)
    assert_one_sentence(code, out, err, 2, *fragments)
    assert snapshot(ws) == before


def test_a_forced_pipeline_with_another_config_is_not_refused_and_an_unfinished_redo_restores_it(
    pipeline_dir, tmp_path, monkeypatch, capsys
):
    """force=true redoes a pipeline whatever its config (it was refused, and told to add force=true);
    a redo that ends without finishing (here: it does nothing) puts the old pipeline back."""
    monkeypatch.setenv("EENN_ROOT", str(tmp_path))
    pipe = tmp_path / "P"
    shutil.copytree(pipeline_dir, pipe)
    before, seen = snapshot(pipe), {}

    def redo(cfg: Any, run: Any) -> Any:
        seen["seed"], seen["aside"] = cfg.seed, sorted(p.name for p in run.path.iterdir())
        return type("Comparison", (), {"failures": []})()

    monkeypatch.setattr("eenn.tasks.pipeline._run_pipeline", redo)
    code, _, err = run_app(
        "pipeline", [*TRAIN, "seed=1", "force=true", "wandb.enabled=false", f"hydra.run.dir={pipe}"], capsys
    )
    assert code == 0, err
    assert seen == {"seed": 1, "aside": sorted([".eenn.old", LOCK_FILE, ".hydra", "pipeline.log"])}
    assert snapshot(pipe) == before


def test_a_forced_sweep_keeps_each_finished_job_the_new_sweep_did_not_finish(made, tmp_path, monkeypatch, capsys):
    """Job by job: a job of the earlier sweep comes back unless the forced sweep finished a job of
    its name; the forced sweep's finished and failed jobs stay."""
    monkeypatch.setenv("EENN_ROOT", str(tmp_path))
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        f"run_dir={made['R']}",
        "policy=entropy",
        "force=true",
        "wandb.enabled=false",
        f"hydra.sweep.dir={sweep}",
    ]
    code, _, err = run_app("fit", [*args, "budget.fraction=0.5,0.6"], capsys)
    assert code == 0, err
    job = "{}_budget.fraction={},force=True,policy=entropy,wandb.enabled=False".format
    first = {n: snapshot(sweep / job(n, b)) for n, b in ((0, 0.5), (1, 0.6))}
    code, _, err = run_app("fit", [*args, "budget.fraction=0.5,-1"], capsys)
    assert code == 1 and "1 job(s) of the sweep" in err, err
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [job(0, 0.5), job(1, -1), job(1, 0.6)]
    redone = snapshot(sweep / job(0, 0.5))
    assert redone["metrics.json"] != first[0]["metrics.json"]  # its own fit, with its own fit_seconds
    assert (sweep / job(1, -1) / "error.json").is_file()
    assert snapshot(sweep / job(1, 0.6)) == first[1]


# --------------------------------------------------------------------------------- SIGKILL
def _kill_points(app: str, jobs: list[dict[str, Any]], tmp_path: Path) -> list[Any]:
    """Each job SIGKILLed at its point, in a fork of one process (tests/reliability/kill_points.py)."""
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "EENN_ROOT": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.reliability.kill_points", app, str(spec)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _without_lock(files: dict[str, bytes | None]) -> dict[str, bytes | None]:
    return {k: v for k, v in files.items() if k != LOCK_FILE}  # it holds the pid of the job that last locked


@pytest.mark.slow
def test_a_forced_redo_killed_at_any_step_leaves_the_old_run_or_the_finished_new_one(made, tmp_path):
    """eenn-fit force=true over a finished fit, SIGKILLed before each rename of the replacement (the
    old run set aside, the new one committed or the old one restored), while the new run writes,
    and before the set-aside run is deleted. What the next job to open the dir finds (it settles
    the dir first): the old run byte for byte, or the new one, finished, with nothing of the old."""
    old = tmp_path / "old"
    shutil.copytree(made["S"] / "0_maxprob", old)
    (old / "only_in_the_old_run.txt").write_text("old")
    before = _without_lock(snapshot(old))
    redo = [f"run_dir={made['R']}", "policy=entropy", "force=true", "wandb.enabled=false"]
    refused = [f"run_dir={made['R']}", "policy=risk", "budget.fraction=0.3", "force=true", "wandb.enabled=false"]
    points = (
        [("redo", f"rename:{n}") for n in range(1, 10)]
        + [("refused", f"rename:{n}") for n in range(1, 16)]
        + [("redo", "call:eenn.rundir:FitRun.write_metrics"), ("redo", "call:shutil:rmtree")]
    )
    jobs = []
    for i, (kind, point) in enumerate(points):
        target = tmp_path / f"job{i}"
        shutil.copytree(old, target)
        jobs.append(
            {
                "kill": point,
                "run_dir": str(target),
                "log": str(tmp_path / f"job{i}.log"),
                "args": [*(redo if kind == "redo" else refused), f"hydra.run.dir={target}"],
            }
        )
    ends = _kill_points("fit", jobs, tmp_path)
    outcomes = []
    for (kind, point), job, end in zip(points, jobs, ends):
        target = Path(job["run_dir"])
        assert end in ("killed", 0 if kind == "redo" else 2), (point, end, Path(job["log"]).read_text()[-2000:])
        FitRun(target).settle()
        after = _without_lock(snapshot(target))
        if after == before:
            outcomes.append("old")
            continue
        assert kind == "redo", (point, sorted(after))  # a refused redo never replaces the run
        assert not any(name in after for name in ("only_in_the_old_run.txt", *REPLACE_DIRS)), (point, sorted(after))
        assert json.loads(after["metrics.json"])["policy"] == "entropy", point
        assert b"policy=entropy" in after[".hydra/overrides.yaml"], point
        outcomes.append("new")
    # the kills struck on both sides of the commit, and the jobs not killed ran to their end
    assert {"old", "new"} <= set(outcomes) and "killed" in ends and set(ends) - {"killed"}, list(zip(points, ends))
