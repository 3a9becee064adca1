"""Hydra helpers."""

from __future__ import annotations

from typing import Any

import hydra
from hydra.errors import InstantiationException

from eenn.errors import EENNError


def instantiate(cfg: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets eenn's own one-sentence errors through unwrapped
    (Hydra wraps every exception of a target in an InstantiationException with the full key)."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, EENNError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
