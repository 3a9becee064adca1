"""Lightning's ``Trainer.fit`` as eenn's jobs call it: Ctrl-C stays an interruption."""

from __future__ import annotations

import signal
import threading
from typing import Any


def interruptible_fit(trainer: Any, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit(*args, **kwargs)``, where Ctrl-C raises KeyboardInterrupt (the apps end in one
    line and exit code 130): Lightning turns it into ``sys.exit(1)`` and ignores SIGINT from then
    on, which this undoes."""
    try:
        trainer.fit(*args, **kwargs)
    except SystemExit:
        if not trainer.interrupted:
            raise
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt from None
