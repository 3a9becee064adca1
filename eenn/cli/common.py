"""What every Hydra entry point shares: where the configs are, and how bad input is reported."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eenn.errors import EENNError

log = logging.getLogger("eenn")


def conf_dir() -> str:
    """The repository's ``conf/`` folder (eenn is installed editable from its checkout)."""
    here = Path(__file__).resolve().parents[2] / "conf"
    if not here.is_dir():
        raise RuntimeError(f"eenn's config folder {here} is missing: install eenn from its checkout (pip install -e .).")
    return str(here)


def quiet_environment() -> None:
    """No network look-ups or prompts: offline hub, and wandb never asks for a login."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_SILENT", "true")


def report_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an EENNError into one clear line on stderr and exit code 2, instead of a traceback."""

    @functools.wraps(task)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except EENNError as exc:
            log.error("%s", exc)
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapped
