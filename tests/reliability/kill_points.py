"""Run an eenn app's console script once per kill point and SIGKILL the job there, as a crash or an
OOM kill would: no exception handler, no ``finally``. Every job is a fork of this one process,
which imported eenn already (an import takes seconds, a fork milliseconds).

    python -m tests.reliability.kill_points <app> <jobs.json>

``jobs.json``: a list of ``{"kill": <point>, "run_dir": <dir>, "args": [...], "log": <file>}``, where
the point is ``rename:N`` (just before the job's N-th ``Path.rename`` of something inside
``run_dir``: the steps of a forced redo's replacement) or ``call:<module>:<qualname>`` (when that
function is first called). Prints, as JSON, each job's end: ``"killed"`` or its exit code.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(point: str, run_dir: str) -> None:
    kind, _, where = point.partition(":")
    if kind == "rename":
        n, seen, rename = int(where), [0], Path.rename

        def counted(self: Path, target: Any) -> Any:
            if str(Path(self).resolve()).startswith(run_dir):
                seen[0] += 1
                if seen[0] == n:
                    _die()
            return rename(self, target)

        Path.rename = counted  # type: ignore[method-assign]
    elif kind == "call":
        module, _, qualname = where.partition(":")
        owner: Any = importlib.import_module(module)
        *path, name = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)

        def killing(*args: Any, **kwargs: Any) -> Any:
            _die()
            return original(*args, **kwargs)

        setattr(owner, name, killing)
    else:
        raise ValueError(f"unknown kill point {point!r}")


def _job(main: Any, app: str, job: dict[str, Any]) -> None:
    """In the forked child: never returns."""
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    _arm(job["kill"], str(Path(job["run_dir"]).resolve()))
    sys.argv = [f"eenn-{app}", *job["args"]]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001  (a crash: its traceback is in the log)
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    app, jobs_file = sys.argv[1:3]
    main_fn = importlib.import_module(f"eenn.cli.{app}").main
    importlib.import_module(f"eenn.tasks.{app}")  # what the job imports late, imported once here
    ends = []
    for job in json.loads(Path(jobs_file).read_text()):
        pid = os.fork()
        if pid == 0:
            _job(main_fn, app, job)
        _, status = os.waitpid(pid, 0)
        ends.append(
            "killed"
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            else os.waitstatus_to_exitcode(status)
        )
    print(json.dumps(ends))


if __name__ == "__main__":
    main()
