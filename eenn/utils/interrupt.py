"""Ctrl-C that cannot be lost. Python raises KeyboardInterrupt wherever the main thread happens to
be, and where that is a ``__del__`` (a profiler's, a file's) or a weakref callback the exception is
printed as "Exception ignored" and swallowed: the app would run on and exit 0. The handler installed
here also latches the interrupt, so the apps check it between jobs and when they end, and a
swallowed one is not printed as a traceback (the app's own "interrupted" line follows)."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

_seen = False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _seen
    _seen = True
    raise KeyboardInterrupt


def _unraisable(hook: object) -> object:
    def on_unraisable(info: sys.UnraisableHookArgs) -> None:
        global _seen
        if isinstance(info.exc_value, KeyboardInterrupt):
            _seen = True
        else:
            hook(info)  # type: ignore[operator]

    on_unraisable.eenn_latch = True  # type: ignore[attr-defined]
    return on_unraisable


def install() -> None:
    """Clear the latch and route SIGINT, and a KeyboardInterrupt that a ``__del__`` drops, through
    it (the handler in the main thread only: signals are delivered there)."""
    global _seen
    _seen = False
    restore()
    if not getattr(sys.unraisablehook, "eenn_latch", False):
        sys.unraisablehook = _unraisable(sys.unraisablehook)


def restore() -> None:
    """Put the latching handler back where a library replaced it (Lightning ignores SIGINT after
    its first one), keeping what the latch saw."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came since :func:`install`, even if it was swallowed."""
    if _seen:
        raise KeyboardInterrupt
