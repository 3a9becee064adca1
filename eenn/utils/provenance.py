"""Which code made a result: eenn's version and, for a git checkout, its commit and whether the
working tree had uncommitted changes (recorded in every training run's metrics, so that a
benchmark can say which commit each of its runs trained on)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """``{"version", "commit", "dirty"}``; commit and dirty are None outside a git checkout. Dirty
    counts changes to tracked files only (outputs and caches are not code)."""
    from eenn import __version__

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"version": __version__, "commit": commit, "dirty": bool(status) if status is not None else None}
