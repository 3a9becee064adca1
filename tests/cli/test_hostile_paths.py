"""Paths as hostile as a sweep job's dir (``=``, ``,``, brackets, quotes, spaces, non-ASCII) work
wherever eenn takes a path, typed as the README says: quoted for Hydra (``key='<dir>'``).

The apps run in-process (their console-script ``main``) on one tiny finished workspace that lives
under such a dir; each parametrised case is one path-taking key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from eenn.cli.train import expand_resume
from eenn.utils.overrides import override, quote
from tests.reliability.workspace import TRAIN, run_app

#: a sweep job's dir name, and the other characters Hydra's override grammar gives a meaning (not
#: ``${``: Hydra re-reads its own run dir as a config value, so a run dir cannot hold one)
HOSTILE = "0_backbone=resnet20,seed=1,p=[a,b] it's ü"
QUICK = ["wandb.mode=disabled"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Under one hostile dir: a finished training run, a fit of it, a small npz dataset."""
    root = tmp_path_factory.mktemp("ws") / HOSTILE
    root.mkdir()
    rng = np.random.default_rng(0)
    np.savez(
        root / "data.npz",
        x_train=rng.integers(0, 256, (120, 8, 8), dtype=np.uint8),
        y_train=np.arange(120) % 3,
        x_test=rng.integers(0, 256, (30, 8, 8), dtype=np.uint8),
        y_test=np.arange(30) % 3,
    )
    return root


def _ok(code: int, err: str) -> None:
    assert code == 0, err[-3000:]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def finished(ws) -> dict[str, Path]:
    run, fit = ws / "run", ws / "fits" / "0_policy=maxprob,budget.fraction=0.6"
    code, _, err = _app(
        "train", [*TRAIN, "data=npz", override("data.path", ws / "data.npz"), override("hydra.run.dir", run)]
    )
    _ok(code, err)
    code, _, err = _app(
        "fit",
        [
            override("run_dir", run),
            "policy=maxprob",
            "budget.fraction=0.6",
            override("hydra.run.dir", fit),
            "wandb.mode=disabled",
        ],
    )
    _ok(code, err)
    return {"run": run, "fit": fit}


def _app(app: str, args: list[str]) -> tuple[int, str, str]:
    """``run_app`` without pytest's capsys (for module fixtures): output goes to the test log."""

    class Nothing:
        out = err = ""

    class NoCapture:
        def readouterr(self) -> Nothing:
            return Nothing()

    return run_app(app, args, NoCapture())


def test_quote_reads_back_as_given_for_every_hostile_character():
    parser = OverridesParser.create()
    for text in [HOSTILE, "${x} \\${y}", "c:\\dir\\", "a\\'b", "tail\\", "'", "\\\\'", "a b\tc", "é,ü=ß"]:
        value = parser.parse_override(override("k", text)).value()
        assert OmegaConf.create({"k": value}).k == text, (text, quote(text))


def test_the_runs_were_made_where_the_hostile_paths_say(finished):
    assert (finished["run"] / "metrics.json").is_file()
    assert json.loads((finished["fit"] / "metrics.json").read_text())["policy"] == "maxprob"
    assert Path(json.loads((finished["fit"] / "metrics.json").read_text())["source_run"]) == finished["run"]


@pytest.mark.parametrize(
    "case", ["run_dir", "predictions", "policy_dir", "infer_run_dir", "export", "bundle", "compare", "data.path"]
)
def test_each_path_taking_key_takes_a_hostile_path(case, finished, ws, tmp_path, capsys):
    run, fit = finished["run"], finished["fit"]
    out = tmp_path / f"out {HOSTILE}"
    if case == "run_dir":
        app, args = "fit", [override("run_dir", run), "policy=entropy", *QUICK]
    elif case == "predictions":
        app, args = (
            "fit",
            [
                override("predictions.val", run / "predictions" / "val.safetensors"),
                override("predictions.test", run / "predictions" / "test.safetensors"),
                *QUICK,
            ],
        )
    elif case == "policy_dir":
        app, args = "infer", [override("policy_dir", fit), "backbone_baseline=false", "edge_cloud.enabled=false"]
    elif case == "infer_run_dir":
        app, args = (
            "infer",
            [
                override("run_dir", run),
                override("policy_file", fit / "policy.safetensors"),
                "backbone_baseline=false",
                "edge_cloud.enabled=false",
            ],
        )
    elif case in ("export", "bundle"):
        bundle_run = tmp_path / f"export {HOSTILE}"
        code, _, err = run_app("export", [override("policy_dir", fit), override("hydra.run.dir", bundle_run)], capsys)
        _ok(code, err)
        if case == "export":
            assert (bundle_run / "bundle").is_dir()
            return
        app, args = (
            "infer",
            [
                "runtime=onnxruntime",
                override("bundle", bundle_run / "bundle"),
                override("run_dir", run),
                "backbone_baseline=false",
                "edge_cloud.enabled=false",
            ],
        )
    elif case == "compare":
        app, args = "compare", [override("sweeps", [fit.parent]), *QUICK]
    else:
        app, args = "train", [*TRAIN, "data=npz", override("data.path", ws / "data.npz"), "seed=3"]
    code, _, err = run_app(app, [*args, override("hydra.run.dir", out)], capsys)
    _ok(code, err)
    assert (out / ".hydra" / "config.yaml").is_file() or (out / "metrics.json").is_file()


def test_resume_takes_a_hostile_run_dir_quoted_or_bare(finished, tmp_path):
    crashed = tmp_path / HOSTILE
    shutil.copytree(finished["run"], crashed)
    (crashed / "metrics.json").unlink()  # it crashed after its last checkpoint
    for typed in (override("resume", crashed), f"resume={crashed}"):
        args = expand_resume([typed, "trainer.max_epochs=3"])
        parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(args)}
        assert OmegaConf.create({"v": parsed["resume"]}).v == str(crashed.resolve())
        assert OmegaConf.create({"v": parsed["hydra.run.dir"]}).v == str(crashed.resolve())


def test_an_unquoted_sweep_dir_is_refused_with_how_to_quote_it(finished, capsys):
    code, _, err = run_app("fit", [f"run_dir={finished['run']}", "policy=maxprob"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "must be quoted for Hydra" in err and "run_dir='<dir>'" in err
