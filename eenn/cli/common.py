"""What every Hydra entry point shares: where the configs are, the guard that claims a run dir
before Hydra writes into it, and how bad input is reported (one sentence, exit code 2).

Every CLI module imports this one before Hydra parses the command line, so it imports nothing
heavy at the top: the run-dir objects (torch) and wandb come in where a job starts or failed, so
that ``--help`` stays fast.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from eenn.errors import EENNError
from eenn.utils import interrupt

log = logging.getLogger("eenn")


def conf_dir() -> str:
    """The repository's ``conf/`` folder (eenn is installed editable from its checkout)."""
    here = Path(__file__).resolve().parents[2] / "conf"
    if not here.is_dir():
        raise RuntimeError(
            f"eenn's config folder {here} is missing: install eenn from its checkout (pip install -e .)."
        )
    return str(here)


def quiet_environment() -> None:
    """wandb never prints login banners or prompts (its mode is settled in eenn.tasks.loggers)."""
    os.environ.setdefault("WANDB_SILENT", "true")


def _launch_id() -> str:
    """A token fixed for this process: two sweeps started in the same second get different dirs."""
    global _LAUNCH_ID
    if _LAUNCH_ID is None:
        _LAUNCH_ID = secrets.token_hex(3)
    return _LAUNCH_ID


_LAUNCH_ID: str | None = None
if not OmegaConf.has_resolver("eenn.launch_id"):
    OmegaConf.register_new_resolver("eenn.launch_id", _launch_id, use_cache=True)


def _share(total: int, fraction: float) -> int:
    """``${eenn.share:${trainer.max_epochs},0.5}``: a share of a whole number, rounded (epochs of a phase)."""
    return int(round(int(total) * float(fraction)))


if not OmegaConf.has_resolver("eenn.share"):
    OmegaConf.register_new_resolver("eenn.share", _share)


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


#: Exit codes: 2 for bad input (a config value, a file, a Hydra override, a refused run dir),
#: 1 for a sweep with failed jobs or an internal error (with its traceback), 130 for Ctrl-C.
BAD_INPUT, INTERRUPTED = 2, 130
_jobs_started = False  # whether Hydra got as far as running a job: errors before that are config errors


def cli(app: Callable[[], Any], rewrite_args: Callable[[list[str]], list[str]] | None = None) -> Callable[[], None]:
    """The console script of the Hydra app ``app``: Hydra's own errors before any job started (an
    unknown key, a misspelled group option, an override it cannot parse) and a refused run dir
    end like every bad input, in one line and exit code 2; Ctrl-C ends in one line and 130.
    ``rewrite_args`` turns the command line into the one Hydra parses (``eenn-train resume=``)."""

    @functools.wraps(app)
    def main() -> None:
        global _jobs_started
        _jobs_started = False
        before = os.environ.get("HYDRA_FULL_ERROR")
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors here instead of printing them and exiting 1
        try:
            if rewrite_args is not None:
                sys.argv[1:] = rewrite_args(sys.argv[1:])
            check_group_values(sys.argv[1:])
            interrupt.install()
            app()
            interrupt.check()  # a Ctrl-C swallowed on the way (in a __del__) still ends the app as one
        except KeyboardInterrupt:
            print(
                "error: interrupted; jobs that finished keep their run dirs, the one that was running is incomplete.",
                file=sys.stderr,
            )
            sys.exit(INTERRUPTED)
        except (EENNError, Refused) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(BAD_INPUT)
        except (HydraException, OmegaConfBaseException) as exc:
            if _jobs_started:
                raise
            print(f"error: {hydra_error_text(exc)}", file=sys.stderr)
            sys.exit(BAD_INPUT)
        finally:
            claims = sys.modules.get("eenn.claims")  # loaded only if a job started
            if claims is not None:
                claims.release_all()
            if before is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)
            else:
                os.environ["HYDRA_FULL_ERROR"] = before

    return main


def check_group_values(args: list[str]) -> None:
    """Refuse a config group set to something other than an option's name (``policy=false``,
    ``data=123``, ``policy=null``), which Hydra fails on with a traceback."""
    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException:  # Hydra says itself what it cannot parse
            continue
        group = Path(conf_dir()) / override.key_or_group
        if override.is_delete() or not group.is_dir():
            continue
        values = list(override.sweep_iterator()) if override.is_discrete_sweep() else [override.value()]
        bad = [
            v
            for v in values
            if not isinstance(v, str) and not (isinstance(v, list) and all(isinstance(e, str) for e in v))
        ]
        if bad:
            options = sorted(p.stem for p in group.glob("*.yaml"))
            raise EENNError(
                f"{override.key_or_group} is a config group: give the name of one of its options "
                f"({', '.join(options)}), got {bad[0]!r}."
            )


def hydra_error_text(exc: BaseException) -> str:
    """Hydra's message on one line: its lines up to the list of options or search paths, which
    follow as one comma-separated list."""
    lines = []
    for line in str(exc).splitlines():
        if not line.strip() or line.startswith(("Available options", "Config search path")):
            break
        lines.append(line.strip())
    options = getattr(exc, "options", None) if isinstance(exc, MissingConfigException) else None
    text = " ".join(lines) + (f"; options: {', '.join(options)}." if options else "")
    if isinstance(exc, OverrideParseException):
        text += (
            " A value holding = , [ ] ' or spaces (a sweep job's dir) must be quoted for Hydra: "
            "in the shell, \"run_dir='<dir>'\"."
        )
    return text


def report_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an EENNError into one clear line on stderr and exit code 2, instead of a traceback.
    In a multirun, any failure is recorded in the job's run dir and the sweep continues."""

    @functools.wraps(task)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        global _jobs_started
        _jobs_started = True
        try:
            return task(*args, **kwargs)
        except Exception as exc:
            from eenn.rundir import RunDir  # here, not at the top: see the module's docstring
            from eenn.tasks.loggers import finish_wandb

            run = RunDir(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
            if _in_multirun() and run is not None:
                run.write_error(exc, list(HydraConfig.get().overrides.task))
                log.error("job %s failed (%s: %s); the sweep goes on", run.path.name, type(exc).__name__, exc)
                finish_wandb()
                return None
            if not isinstance(exc, EENNError):
                raise
            log.error("%s", exc)
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(BAD_INPUT)  # the run dir's claim ends in cli(): a refused job leaves no run dir behind

    return wrapped


#: config nodes that take keys added with ``+`` (``+trainer.gradient_clip_val=1``): each is passed
#: whole to something that refuses a key it does not take (Lightning's Trainer, the data module, a
#: backbone, a policy...). A key added anywhere else would be read by nobody.
OPEN_KEYS = (
    "trainer",
    "data",
    "training",
    "backbone",
    "exits",
    "callbacks",
    "logger",
    "policy",
    "pipeline.policy_overrides",
)


def check_added_keys(config: DictConfig) -> None:
    """Refuse a ``+key=value`` override that adds a key the app never reads (``+budgt.fraction=0.9``
    would otherwise be ignored in silence)."""
    from eenn.utils.nested import flatten  # here, not at the top: see the module's docstring

    groups = set(config.hydra.runtime.choices)
    for override in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
        key = override.key_or_group
        if not override.is_add() or key in groups or key.split(".")[0] == "hydra":
            continue
        if any(key.startswith(f"{node}.") and OmegaConf.select(config, node) is not None for node in OPEN_KEYS):
            continue
        known = [k for k in flatten(OmegaConf.to_container(config)) if not k.startswith("hydra.") and k != key]
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise EENNError(
            f"+{key}: eenn-{config.task_name} reads no key {key!r}{hint}; keys are added with + only "
            f"under {', '.join(OPEN_KEYS)}."
        )


#: keys whose default is a boolean but that take more: Lightning's trainer.deterministic="warn" and
#: ModelCheckpoint's save_last="link"
NOT_ONLY_BOOLEAN = ("trainer.deterministic", "callbacks.model_checkpoint.save_last")


def check_flags(config: DictConfig) -> None:
    """Refuse a command-line value other than true or false for a key whose default is a boolean
    (``backbone_baseline=maybe`` would be a string, which every ``if`` takes as true). The defaults
    are the app's config composed with the command line's config groups alone."""
    from hydra import compose

    from eenn.errors import check_flag

    groups = set(config.hydra.runtime.choices)
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    values = [
        o
        for o in overrides
        if o.key_or_group not in groups
        and not o.is_delete()
        and o.key_or_group.split(".")[0] != "hydra"
        and o.key_or_group not in NOT_ONLY_BOOLEAN
    ]
    if not values:
        return
    defaults = compose(
        config.hydra.job.config_name,
        overrides=[o.input_line for o in overrides if o.key_or_group in groups and not o.is_sweep_override()],
    )
    for o in values:
        if isinstance(OmegaConf.select(defaults, o.key_or_group), bool):
            for value in o.sweep_iterator() if o.is_discrete_sweep() else [o.value()]:
                check_flag(value, o.key_or_group)


def _slurm_launcher(config: DictConfig) -> str | None:
    """ "hydra/launcher <choice>" where the choice submits to Slurm, else None."""
    if "SlurmLauncher" not in str(config.hydra.launcher.get("_target_", "")):
        return None
    return f"hydra/launcher {config.hydra.runtime.choices.get('hydra/launcher')}"


def check_one_run(config: DictConfig) -> None:
    """Refuse what only a multirun uses, given without ``-m``: a sweep preset (``budget=sweep5``
    would fit its first budget alone, unless the command line picks one: ``budget.point=2``) or a
    Slurm launcher (the job would run here)."""
    given = {o.key_or_group for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))}
    swept = {k: v for k, v in (config.hydra.sweeper.get("params") or {}).items() if k not in given}
    if swept:
        shown = "; ".join(f"{k}: {v}" for k, v in swept.items())
        raise EENNError(
            f"the config sweeps {shown} (hydra.sweeper.params, set by a preset such as budget=sweep5), "
            f"which only a multirun does: add -m, or set {next(iter(swept))} to run one of its values."
        )
    launcher = _slurm_launcher(config)
    if launcher:
        raise EENNError(
            f"{launcher} submits the jobs of a multirun to Slurm, and without -m this job would run here: add -m."
        )


def check_slurm(config: DictConfig) -> None:
    """A Slurm launcher needs Slurm's commands and a controller that answers (submitit would fail
    with a traceback and leave its .submitit/ folder behind)."""
    launcher = _slurm_launcher(config)
    if launcher is None:
        return
    if shutil.which("srun") is None or shutil.which("scontrol") is None:
        raise EENNError(
            f"{launcher}: Slurm is not installed here (no srun or scontrol command); run on the "
            "cluster, or leave hydra/launcher out to run the sweep here."
        )
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
        up = ping.returncode == 0 and " UP" in ping.stdout
    except subprocess.TimeoutExpired:
        up = False
    if not up:
        raise EENNError(
            f"{launcher}: no Slurm controller is reachable (scontrol ping says it is down); start it, or "
            "leave hydra/launcher out to run the sweep here."
        )


class Refused(BaseException):
    """Bad input found by a Hydra callback: Hydra turns a callback's Exception into a warning and
    runs the job anyway, so the refusal travels as a BaseException to :func:`cli`."""


def _refuse_bad_input(hook: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(hook)
    def wrapped(*args: Any, **kwargs: Any) -> None:
        try:
            hook(*args, **kwargs)
        except EENNError as exc:
            raise Refused(exc) from None

    return wrapped


class RunDirGuard(Callback):
    """Claim the job's run dir (or the sweep's dir) before Hydra writes its config and log into it:
    a finished run is refused there and stays byte for byte as it was (see
    :meth:`eenn.rundir.RunDir.claim`). The run's lock is held until the job ends."""

    def __init__(self) -> None:
        self.held: list[Any] = []

    @_refuse_bad_input
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from eenn.rundir import RUN_TYPES  # here, not at the top: see the module's docstring

        check_added_keys(config)
        check_flags(config)
        check_one_run(config)
        # the app's own checks of its config, before the run dir is touched (a job may refuse
        # more once it reads its inputs, and then leaves the dir as it found it)
        check = getattr(importlib.import_module(f"eenn.tasks.{config.task_name}"), "check_config", None)
        if check is not None:
            check(config)
        self._claim(RUN_TYPES[config.task_name](os.path.abspath(config.hydra.run.dir)), config)

    @_refuse_bad_input
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from eenn.rundir import SweepDir

        check_added_keys(config)
        check_flags(config)
        check_slurm(config)
        self._claim(SweepDir(os.path.abspath(config.hydra.sweep.dir)), config)

    def _claim(self, run: Any, config: DictConfig) -> None:
        from eenn.errors import check_flag

        force = check_flag(config.get("force", False), "force")
        run.claim(force=force, resume=not force and run.resumes(config))  # force=true redoes a run it would resume
        self.held.append(run)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        while self.held:
            self.held.pop().release()

    on_multirun_end = on_run_end


class SweepSummary(Callback):
    """At the end of a multirun: say how many jobs failed and exit non-zero if any."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from eenn.rundir import ERROR_FILE, failed_jobs  # here, not at the top: see the module's docstring

        sweep = Path(config.hydra.sweep.dir)
        failed = failed_jobs(sweep)
        if failed:
            print(
                f"error: {len(failed)} job(s) of the sweep in {sweep} failed: {', '.join(failed)} (see their "
                f"{ERROR_FILE})",
                file=sys.stderr,
            )
            sys.exit(1)
