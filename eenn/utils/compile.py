"""``torch.compile`` for a network eenn runs, with an eager fallback that says why in one line.

A network that dynamo or the inductor backend cannot compile (an op it does not support, no C++
compiler for the CPU backend) fails at its first call; there :class:`Compiled` logs one warning
naming the setting and the error, and runs the function eagerly from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("eenn.compile")


class Compiled:
    """``fn`` compiled by ``torch.compile(fn, **options)``; ``setting`` (e.g. ``training.compile=true``)
    and ``what`` name them in the fallback's warning."""

    def __init__(self, fn: Callable[..., Any], setting: str, what: str, **options: Any) -> None:
        self.fn, self.setting, self.what = fn, setting, what
        self.call: Callable[..., Any] = torch.compile(fn, **options)
        self.first = True
        self.eager = False  # true once compiling failed

    def __call__(self, *args: Any) -> Any:
        if not self.first:
            return self.call(*args)
        try:
            out = self.call(*args)
        except Exception as e:  # noqa: BLE001 - any compile failure falls back; a real error recurs eagerly
            cause = _root_cause(e)
            message = (str(cause).strip().splitlines() or [""])[0][:200]
            log.warning(
                "%s: %s could not be compiled (%s: %s); running it eagerly.",
                self.setting,
                self.what,
                type(cause).__name__,
                message,
            )
            self.call, self.eager = self.fn, True
            out = self.fn(*args)
        self.first = False
        return out


def _root_cause(e: BaseException) -> BaseException:
    """The error under dynamo's wrappers (BackendCompilerFailed's ``inner_exception``, causes):
    what the user can act on."""
    while True:
        inner = getattr(e, "inner_exception", None) or e.__cause__
        if inner is None:
            return e
        e = inner


def make_room(modules: int) -> None:
    """Let dynamo keep the graphs of ``modules`` more compiled modules.

    ``torch.compile`` runs every ``nn.Module`` through one dynamo frame (``inner`` in
    ``torch._dynamo.external_utils``) whose graph cache all modules compiled in the process share,
    and past its ``recompile_limit`` (8) dynamo runs a module eagerly after one warning: an engine's
    stages and heads, each with a few graphs (a batch of one, a dynamic batch, inputs made inside
    and outside inference mode), pass 8 with three exits. The room adds up, engine by engine, as
    the shared cache does."""
    torch._dynamo.config.recompile_limit += 4 * modules
