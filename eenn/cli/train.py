"""``eenn-train``: stage 1, train a multi-exit network and write its run dir."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from eenn.cli.common import cli, conf_dir, quiet_environment, report_errors
from eenn.errors import EENNError, check_flag
from eenn.utils.overrides import override

#: what ``resume=`` sets itself, so a resumed run's saved overrides give these up
RESUME_SETS = ("resume", "ckpt_path", "force")


@hydra.main(config_path=conf_dir(), config_name="train", version_base="1.3")
@report_errors
def app(cfg: DictConfig) -> float | list[float] | None:
    from eenn.tasks.train import objective_values, train  # after Hydra parsed the command line: --help stays fast

    quiet_environment()
    # a sweeper that optimises (hydra/sweeper=optuna_exits) reads the objective the job returns
    return objective_values(cfg, train(cfg))


def expand_resume(args: list[str]) -> list[str]:
    """``resume=<run dir>``: that stage-1 run again, in its own dir, from its last checkpoint. The
    command line becomes the run's own overrides (as Hydra saved them: :meth:`RunDir.overrides`),
    then ``hydra.run.dir=<dir> ckpt_path=last``, then the rest of this command line (which wins
    where it sets the same key, e.g. ``trainer.max_epochs`` to train on). The job checks that the
    config composes as the run's saved one (:meth:`eenn.rundir.TrainRun.check_resume`). A run with
    nothing to resume (finished, or stopped before its first checkpoint) is refused here, before
    Hydra logs into its dir; with ``force=true`` the run restarts from scratch instead."""
    given = [a for a in args if a.startswith("resume=")]
    if not given:
        return args
    if any(a in ("-m", "--multirun") for a in args):
        raise EENNError("resume=<run dir> continues one run; it cannot be part of a sweep (-m).")
    from eenn.rundir import TrainRun  # only here: torch comes with it (see eenn.cli.common)

    parser = OverridesParser.create()
    run_dir = Path(given_value(parser, given[-1])).expanduser().resolve()
    rest = [a for a in args if not a.startswith("resume=")]
    if any(a.startswith("hydra.run.dir=") for a in rest):
        raise EENNError("resume=<run dir> runs in that dir: leave hydra.run.dir out.")
    forced = [a for a in rest if a.startswith("force=")]
    force = bool(forced) and check_flag(parser.parse_override(forced[-1]).value(), "force")
    run = TrainRun(run_dir)
    run.check_resumable(force)
    saved_overrides = run.overrides(key="resume")

    def keys(items: list[str]) -> set[str]:
        return {o.key_or_group for o in parser.parse_overrides([i for i in items if not i.startswith("-")])}

    given_keys = keys(rest) | set(RESUME_SETS)
    saved = [o for o in saved_overrides if next(iter(keys([o]))) not in given_keys]
    if force:  # the run restarts from scratch with its own overrides, and Hydra saves them anew
        return [*saved, override("resume", run_dir), override("hydra.run.dir", run_dir), *rest]
    # no .hydra/ from Hydra for this job: the run's saved config is what the job checks itself
    # against (then saves its own), and its overrides.yaml stays the run's
    return [
        *saved,
        override("resume", run_dir),
        override("hydra.run.dir", run_dir),
        "hydra.output_subdir=null",
        "ckpt_path=last",
        *rest,
    ]


def given_value(parser: OverridesParser, arg: str) -> str:
    """The value of ``key=value`` as typed: Hydra-quoted (``resume='<dir>'``) or a bare path, whose
    ``=`` and ``,`` (a sweep job's dir) Hydra would misread."""
    raw = arg.split("=", 1)[1]
    try:
        value = parser.parse_override(arg).value()
    except Exception:  # noqa: BLE001  (not Hydra syntax: the path as typed)
        return raw
    return value if isinstance(value, str) else raw


main = cli(app, rewrite_args=expand_resume)

if __name__ == "__main__":
    main()
