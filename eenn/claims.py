"""Claiming a run dir for a job, and the rest of a run's lifecycle in it: a job writes only into an
empty dir, or into its own app's run that it resumes or is told to redo (``force=true``: the old
run is kept aside in the dir until the new one has finished, and comes back if it does not); a
lock (:mod:`eenn.locking`) keeps a second job out while the first one runs.

:class:`Claimable` is what :class:`eenn.rundir.RunDir` inherits; it asks the run dir object what
the layout knows: its ``APP``, ``outputs()``, ``saved_app()``, ``finished()`` and
``resume_hint()``, and ``_settler()`` for the object whose rules settle a dir."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from eenn.errors import EENNError
from eenn.locking import LOCK_FILE, in_use, lock_dir, lock_holder

log = logging.getLogger("eenn")

#: A forced redo moves the old run (every entry but the lock) into ASIDE inside its dir, and at the
#: job's end deletes it if the new run finished, else puts it back (:meth:`Claimable.settle`).
#: Moving many entries is not one rename, so each move goes through a dir whose name says which
#: move it is: a job killed midway leaves a state the next one to claim or read the dir completes.
ASIDE, MOVING, RESTORING, DISCARD = ".eenn.old", ".eenn.old-moving", ".eenn.old-restoring", ".eenn.old-discarded"
REPLACE_DIRS = (ASIDE, MOVING, RESTORING, DISCARD)

# the run dirs this process holds: resolved path -> [lock file descriptor, claims, created by the claim,
# the run dir object of the first claim (its type says when its run is finished)]
_HELD: dict[Path, list[Any]] = {}


def is_rank_zero() -> bool:
    """Whether this process is a job's first (a DDP worker's launcher or SLURM sets its rank)."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def release_all() -> None:
    """End every claim this process holds as a failed job's (an app ended by bad input or Ctrl-C
    skips Hydra's run-end callback; an in-process caller, such as a test, then claims afresh): a
    forced redo's old run comes back unless the new one finished, and a dir the job created that
    holds nothing but Hydra's files goes."""
    while _HELD:
        _end(next(iter(_HELD)), failed=True)


def _end(key: Path, failed: bool) -> None:
    fd, _, created, run = _HELD.pop(key)
    try:
        run._settle()  # under the job's own lock, still held
        if failed and created:
            run.remove_if_only_hydra_files()
    finally:
        os.close(fd)


class Claimable:
    """A run dir's lifecycle: claim, release, and the forced redo's swap (see the module docstring)."""

    APP: ClassVar[str] = ""
    path: Path

    def outputs(self) -> list[str]:
        raise NotImplementedError

    def saved_app(self) -> str | None:
        raise NotImplementedError

    def finished(self) -> bool:
        raise NotImplementedError

    def resume_hint(self) -> str:
        return ""

    def _settler(self) -> Claimable:
        return self

    def claim(self, force: bool = False, resume: bool = False) -> None:
        """Make this dir the run dir of a job of :attr:`APP` for this process, before anything is
        written into it. Refused, by an EENNError naming the dir: a dir holding another app's run
        or other files; a run of this app, unless the job resumes it or is forced; a dir another
        job holds (its lock); a dir that cannot be written. A forced job moves the old run aside
        (:data:`ASIDE`): the last :meth:`release` deletes it if the new run finished and puts it
        back otherwise. Claims nest: :meth:`release` each one."""
        key = self.path.resolve()
        if not is_rank_zero():  # a DDP worker writes into the dir its rank-0 process claimed
            return
        if key in _HELD:
            _HELD[key][1] += 1
            return
        holder = lock_holder(self.path)
        if holder is not None:
            raise in_use(self.path, holder)
        self.settle()
        self._check_outputs(force, resume)  # a refused claim writes nothing
        created = not self.path.exists()
        fd, previous = lock_dir(self.path)
        try:
            self._check_outputs(force, resume)  # again: another job may have finished meanwhile
            if force and self.outputs():
                self._set_aside(previous)
        except BaseException:
            os.close(fd)
            raise
        _HELD[key] = [fd, 1, created, self]

    def release(self, failed: bool = False) -> None:
        """End a claim. The last one settles a forced redo (the new run replaces the old one if it
        finished; the old one comes back otherwise), removes the dir it created if the job was
        refused (``failed``) and the dir holds nothing but Hydra's files, and unlocks."""
        key = self.path.resolve()
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            _end(key, failed)

    # ------------------------------------------------------------ forced redo
    def settle(self) -> None:
        """Complete what a forced redo killed midway left in this dir (:data:`ASIDE`): the new run
        stays if it finished, else the old run comes back whole (a sweep's: job by job). Nothing
        where no redo left anything, where a job holds the dir (it settles it itself), or where
        the dir cannot be written (its claim then refuses it)."""
        if not any((self.path / name).exists() for name in REPLACE_DIRS) or self.path.resolve() in _HELD:
            return
        try:
            fd, _ = lock_dir(self.path)
        except EENNError:
            return
        try:
            log.warning("run dir %s holds a forced redo that was stopped midway: settling it", self.path)
            self._settler()._settle()
        finally:
            os.close(fd)

    def _set_aside(self, lock_content: bytes) -> None:
        """The first step of a forced redo: every entry but the lock into :data:`ASIDE`, with what
        the lock file held before this job wrote its pid (so that a restored run is byte for byte
        the old one)."""
        moving = self.path / MOVING
        moving.mkdir()
        (moving / LOCK_FILE).write_bytes(lock_content)
        for entry in list(self.path.iterdir()):
            if entry.name not in (LOCK_FILE, MOVING):
                entry.rename(moving / entry.name)
        moving.rename(self.path / ASIDE)

    def _settle(self) -> None:
        """Run, under the dir's lock, whatever steps of a forced redo's replacement remain; each
        one can be taken up again where a kill stopped it."""
        moving, aside, restoring, discard = (self.path / name for name in (MOVING, ASIDE, RESTORING, DISCARD))
        if moving.is_dir():  # stopped while setting the old run aside: nothing new was written yet
            move_entries(moving, self.path)
        if aside.is_dir():
            self._replace_or_restore(aside, discard)
        if restoring.is_dir():
            move_entries(restoring, self.path)
        if discard.exists():
            shutil.rmtree(discard)

    def _replace_or_restore(self, aside: Path, discard: Path) -> None:
        """The new run, if it finished, replaces the old one in ``aside``; otherwise the new run's
        entries go to ``discard`` and the old run is renamed :data:`RESTORING` to move back."""
        discard.mkdir(exist_ok=True)
        if self.finished():
            aside.rename(discard / ASIDE)
            return
        for entry in list(self.path.iterdir()):
            if entry.name not in (LOCK_FILE, *REPLACE_DIRS):
                entry.rename(discard / entry.name)
        aside.rename(self.path / RESTORING)

    @contextlib.contextmanager
    def claimed(self, force: bool = False, resume: bool = False) -> Iterator[None]:
        """:meth:`claim` for the duration of a job; a job refused by bad input leaves no dir behind."""
        self.claim(force, resume)
        refused = True
        try:
            yield
            refused = False
        except EENNError:
            raise
        except BaseException:
            refused = False  # a crash keeps what it made, for resuming or a bug report
            raise
        finally:
            self.release(refused)

    def _check_outputs(self, force: bool, resume: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise EENNError(f"run dir {str(self.path)!r} is a file, not a directory.")
        found = self.outputs()
        if not found:
            return
        saved = self.saved_app()
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        if saved != self.APP:
            what = f"an eenn-{saved} run" if saved else "files of no eenn run"
            raise EENNError(
                f"run dir {str(self.path)!r} holds {what} ({shown}): eenn-{self.APP} never writes into "
                "it, force=true included; choose another hydra.run.dir."
            )
        if force:  # before resume: force=true redoes a run even where the job would resume it
            return
        if not resume:
            state = "finished" if self.finished() else "started"
            raise EENNError(
                f"run dir {str(self.path)!r} holds a {state} eenn-{self.APP} run, which is never written "
                f"into again{self.resume_hint()}: add force=true to overwrite it, or choose another "
                "hydra.run.dir."
            )

    def remove_if_only_hydra_files(self) -> None:
        """Remove the run dir of a refused job when it holds nothing but Hydra's config and log
        and the lock: a run dir with anything more (a resumed run's checkpoints, or a forced
        redo's old run, say) is never deleted."""
        if self.path.is_dir() and not self.outputs():
            if any(self.path.glob("*.log")):
                logging.shutdown()  # Hydra's log handler holds <job>.log open
            shutil.rmtree(self.path, ignore_errors=True)


def move_entries(src: Path, dst: Path) -> None:
    """Every entry of ``src`` into ``dst``, then ``src`` itself removed. A lock file's content is
    copied into ``dst``'s: renaming it would swap the file a job holds its lock on."""
    for entry in list(src.iterdir()):
        if entry.name == LOCK_FILE:
            (dst / LOCK_FILE).write_bytes(entry.read_bytes())
            entry.unlink()
        else:
            entry.rename(dst / entry.name)
    src.rmdir()
