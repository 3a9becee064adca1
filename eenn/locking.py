"""A run dir's lock: an exclusive ``flock`` on its lock file, which holds the pid of the job that
writes into the dir, so that two jobs never share a run dir (read by :mod:`eenn.claims`)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from eenn.errors import EENNError

LOCK_FILE = ".eenn.lock"  # held (flock) by the job writing into the dir; it holds that job's pid


def lock_dir(path: Path) -> tuple[int, bytes]:
    """Lock ``path`` for this job (the lock file then holds its pid); the file descriptor, and
    what the lock file held before. A dir another job holds, or one that cannot be written, is
    an EENNError naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise EENNError(f"run dir {str(path)!r} cannot be written: {exc.strerror}.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise in_use(path, holder) from None
    previous = os.pread(fd, 64, 0)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, previous


def lock_holder(path: Path) -> str | None:
    """The pid of the job that holds ``path``'s lock now, read without creating anything; None
    where no job does."""
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)  # closing drops the shared lock taken to probe


def in_use(path: Path, holder: str) -> EENNError:
    """The refusal of a dir another job holds."""
    return EENNError(
        f"run dir {str(path)!r} is in use by another job (pid {holder}): two jobs never share "
        "a run dir; wait for it to end, or choose another hydra.run.dir."
    )
