"""What every Hydra entry point shares: where the configs are, and how bad input is reported.

Every CLI module imports this one before Hydra parses the command line, so it imports nothing
heavy at the top: the run-dir objects (torch) and wandb come in where a job failed, so that
``--help`` stays fast.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from eenn.errors import EENNError

log = logging.getLogger("eenn")


def conf_dir() -> str:
    """The repository's ``conf/`` folder (eenn is installed editable from its checkout)."""
    here = Path(__file__).resolve().parents[2] / "conf"
    if not here.is_dir():
        raise RuntimeError(f"eenn's config folder {here} is missing: install eenn from its checkout (pip install -e .).")
    return str(here)


def quiet_environment() -> None:
    """wandb never prints login banners or prompts (its mode is settled in eenn.utils.loggers)."""
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


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def report_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an EENNError into one clear line on stderr and exit code 2, instead of a traceback.
    In a multirun, any failure is recorded in the job's run dir and the sweep continues."""

    @functools.wraps(task)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except Exception as exc:
            from eenn.rundir import RunDir  # here, not at the top: see the module's docstring
            from eenn.utils.loggers import finish_wandb

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
            if run is not None:  # a refused job leaves no run dir behind
                run.remove_if_only_hydra_files(HydraConfig.get().job.name)
            sys.exit(2)

    return wrapped


class SweepSummary(Callback):
    """At the end of a multirun: say how many jobs failed and exit non-zero if any."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from eenn.rundir import ERROR_FILE, failed_jobs  # here, not at the top: see the module's docstring

        sweep = Path(config.hydra.sweep.dir)
        failed = failed_jobs(sweep)
        if failed:
            print(f"error: {len(failed)} job(s) of the sweep in {sweep} failed: {', '.join(failed)} (see their {ERROR_FILE})",
                  file=sys.stderr)
            sys.exit(1)
