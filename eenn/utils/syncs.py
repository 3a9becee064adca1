"""Count host-device synchronisations in a stretch of code.

On CUDA, PyTorch reports every synchronising call itself (``torch.cuda.set_sync_debug_mode``):
``.item()``, ``nonzero``, a blocking copy either way, and the rest. On the CPU nothing
synchronises, so the calls that would, had the tensors been on a GPU, are counted instead:

- conversions to Python: ``.item()``, ``.tolist()``, ``bool()`` / ``float()`` / ``int()`` / an
  index of a tensor, ``.cpu()`` and ``.numpy()``;
- the ops whose output size depends on the data, which CUDA learns from the device:
  ``nonzero``, ``unique``, ``bincount``, ``masked_select``, ``repeat_interleave`` with tensor repeats.

Not counted: ``.item()`` inside torch's optimisers, which read their step counters from CPU
tensors on purpose (Adam's ``state["step"]`` stays on the host unless ``capturable``), no sync on
a GPU either. Each call is recorded with the first caller outside torch, so a count says where to
look::

    with SyncCounter() as syncs:
        step()
    syncs.total, syncs.where          # 0, Counter()
"""

from __future__ import annotations

import collections
import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

#: the calls counted on the CPU: tensor methods, and torch functions
_TENSOR_METHODS = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "nonzero",
    "unique",
    "bincount",
    "masked_select",
)
_TORCH_FUNCTIONS = ("nonzero", "unique", "bincount", "masked_select")
_TORCH_DIR = str(Path(torch.__file__).parent)
_OPTIM_DIR = str(Path(torch.optim.__file__).parent)
_SYNC_WARNING = "called a synchronizing CUDA operation"


def _tensor_repeats(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a ``repeat_interleave`` call takes its repeats from a tensor (sized by the data)."""
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if args else None)
    return isinstance(repeats, torch.Tensor) and repeats.numel() > 1


def _caller() -> str:
    """``path:line`` of the innermost frame outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_TORCH_DIR) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    if frame is None:
        return "?"
    name = frame.f_code.co_filename
    short = name.split("site-packages/")[-1] if "site-packages/" in name else "/".join(Path(name).parts[-3:])
    return f"{short}:{frame.f_lineno}"


class SyncCounter:
    """Counts synchronisations while ``active`` (true from ``__enter__``; a caller may toggle it to
    count only some stretches, e.g. training steps). ``cuda=True`` counts the real ones through
    PyTorch's sync debug mode; otherwise the CPU stand-ins listed in the module docstring."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.active = False
        self.where: collections.Counter[str] = collections.Counter()
        self._saved: list[tuple[Any, str, Any, bool]] = []
        self._warnings: Any = None
        self._records: list[warnings.WarningMessage] | None = None
        self._depth = 0  # a counted call made inside another (bool() calling item) counts once

    @property
    def total(self) -> int:
        return sum(self.where.values())

    def take(self) -> collections.Counter[str]:
        """The calls counted since the last ``take`` (and forget them)."""
        self.collect()
        where, self.where = self.where, collections.Counter()
        return where

    def _wrap(self, fn: Callable[..., Any], what: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if (
                self.active
                and self._depth == 0
                and (what != "repeat_interleave" or _tensor_repeats(args, kwargs))
                and not sys._getframe(1).f_code.co_filename.startswith(_OPTIM_DIR)
            ):
                self.where[f"{what} @ {_caller()}"] += 1
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def __enter__(self) -> SyncCounter:
        if self.cuda:
            self._warnings = warnings.catch_warnings(record=True)
            self._records = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            targets = [(torch.Tensor, n) for n in (*_TENSOR_METHODS, "repeat_interleave")]
            targets += [(torch, n) for n in (*_TORCH_FUNCTIONS, "repeat_interleave")]
            for owner, name in targets:
                original = getattr(owner, name)
                self._saved.append((owner, name, original, name in vars(owner)))
                setattr(owner, name, self._wrap(original, name.strip("_")))
        self.active = True
        return self

    def collect(self) -> None:
        """On CUDA, move the sync warnings raised so far into ``where``."""
        if self._records is not None:
            for w in self._records:
                if _SYNC_WARNING in str(w.message):
                    self.where[f"cuda sync @ {Path(w.filename).name}:{w.lineno}"] += 1
            self._records.clear()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.active = False
        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
            self.collect()
            self._warnings.__exit__(exc_type, exc, tb)
            self._records = None
        for owner, name, original, own in reversed(self._saved):
            if own:
                setattr(owner, name, original)
            else:  # it was inherited (torch.Tensor's C methods): drop the shadowing wrapper
                delattr(owner, name)
        self._saved.clear()
