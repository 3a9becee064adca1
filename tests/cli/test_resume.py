"""``eenn-train resume=<run dir>``: the command line it becomes, and the runs it refuses."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eenn.cli.train import expand_resume
from eenn.errors import EENNError
from eenn.rundir import TrainRun
from eenn.tasks.train import train

SMALL = [
    "logger=csv",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "cost.latency=false",
    "trainer.enable_progress_bar=false",
]


def _saved_overrides(run: Path, overrides: list[str]) -> None:
    """A crashed run: its overrides and a last checkpoint (expand_resume looks for one, not in it)."""
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")


def test_resume_replays_the_runs_overrides_in_its_dir_from_last(tmp_path):
    run = tmp_path / "crashed"
    _saved_overrides(run, ["data=digits", "trainer.max_epochs=5", "ckpt_path=last", f"resume={run}", "seed=3"])
    args = expand_resume([f"resume={run}", "trainer.max_epochs=8"])
    q = f"'{run.resolve()}'"
    # its own resume/ckpt_path give way to the new ones; a key given again takes the new value
    assert args == [
        "data=digits",
        "seed=3",
        f"resume={q}",
        f"hydra.run.dir={q}",
        "hydra.output_subdir=null",
        "ckpt_path=last",
        "trainer.max_epochs=8",
    ]
    assert expand_resume(["data=digits"]) == ["data=digits"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["resume={run}", "-m"], r"resume=<run dir> continues one run; it cannot be part of a sweep \(-m\)"),
        (["resume={run}", "hydra.run.dir=/elsewhere"], "resume=<run dir> runs in that dir: leave hydra.run.dir out"),
        (
            ["resume={tmp}/nothing"],
            r"resume='.*nothing' is not an eenn-train run dir \(no .hydra/overrides.yaml in it\)",
        ),
    ],
)
def test_resume_refuses_what_it_cannot_continue(tmp_path, args, message):
    run = tmp_path / "crashed"
    _saved_overrides(run, [])
    with pytest.raises(EENNError, match=message):
        expand_resume([a.format(run=run, tmp=tmp_path) for a in args])


def test_resume_refuses_a_config_that_composes_otherwise(compose_cfg, tmp_path):
    cfg = compose_cfg("train", SMALL)
    cfg.paths.output_dir = str(tmp_path / "run")
    train(cfg)
    again = compose_cfg("train", [*SMALL, "ckpt_path=last", f"resume={tmp_path / 'run'}", "seed=4"])
    again.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(
        EENNError,
        match=r"today's configs compose differently from the run's saved config \(data.seed: 0 -> 4; seed: 0 -> 4\)",
    ):
        train(again)
    again.seed = 0
    again.paths.output_dir = str(tmp_path / "elsewhere")
    with pytest.raises(EENNError, match="runs in that dir, but paths.output_dir is"):
        train(again)
    again.paths.output_dir = str(tmp_path / "run")
    again.trainer.max_epochs = 3  # the cosine schedule follows it: training on longer is another run
    with pytest.raises(EENNError, match=r"\(training.scheduler.T_max: 2 -> 3\)"):
        train(again)
    again.trainer.max_epochs = 2
    again.trainer.enable_progress_bar = True  # how it shows its progress may change
    train(again)
    assert TrainRun(tmp_path / "run").metrics()["epochs"] == 2
