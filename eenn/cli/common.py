"""What every Hydra entry point shares: where the configs are, and how bad input is reported."""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
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


def _remove_empty_run_dir() -> None:
    """A job refused for bad input leaves no run dir behind, unless it holds more than Hydra's own
    config and log (a resumed run's checkpoints, say): finished outputs are never deleted."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if not run_dir.is_dir():
        return
    own = {".hydra", f"{HydraConfig.get().job.name}.log"}
    if all(p.name in own for p in run_dir.iterdir()):
        logging.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _record_failure(exc: BaseException) -> None:
    """In a sweep, a failed job writes error.json and lets the others run (eenn-compare lists it)."""
    from hydra.core.hydra_config import HydraConfig

    from eenn.utils.io import write_json

    out = Path(HydraConfig.get().runtime.output_dir)
    write_json(out / "error.json", {
        "type": type(exc).__name__,
        "message": str(exc),
        "overrides": list(HydraConfig.get().overrides.task),
        "traceback": "" if isinstance(exc, EENNError) else traceback.format_exc(),
    })
    log.error("job %s failed (%s: %s); the sweep goes on", out.name, type(exc).__name__, exc)


def report_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an EENNError into one clear line on stderr and exit code 2, instead of a traceback.
    In a multirun, any failure is recorded in the job's error.json and the sweep continues."""

    @functools.wraps(task)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except Exception as exc:
            if _in_multirun():
                from eenn.utils.loggers import finish_wandb

                _record_failure(exc)
                finish_wandb()
                return None
            if not isinstance(exc, EENNError):
                raise
            log.error("%s", exc)
            print(f"error: {exc}", file=sys.stderr)
            _remove_empty_run_dir()
            sys.exit(2)

    return wrapped


class SweepSummary(Callback):
    """At the end of a multirun: say how many jobs failed (their error.json) and exit non-zero if any."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        failed = sorted(p.parent.name for p in sweep.glob("*/error.json"))
        if failed:
            print(f"error: {len(failed)} job(s) of the sweep in {sweep} failed: {', '.join(failed)} (see their error.json)",
                  file=sys.stderr)
            sys.exit(1)
