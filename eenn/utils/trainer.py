"""Lightning's ``Trainer.fit`` as eenn's jobs call it: Ctrl-C stays an interruption."""

from __future__ import annotations

from typing import Any

from eenn.utils import interrupt


def interruptible_fit(trainer: Any, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit(*args, **kwargs)``, where Ctrl-C raises KeyboardInterrupt (the apps end in one
    line and exit code 130): Lightning turns it into ``sys.exit(1)`` and ignores SIGINT from then
    on, which this undoes."""
    try:
        trainer.fit(*args, **kwargs)
    except SystemExit:
        if not trainer.interrupted:
            raise
        interrupt.restore()
        raise KeyboardInterrupt from None
