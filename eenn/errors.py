"""Bad input: the one exception type eenn raises for it (the CLI prints its message alone), and
the checks that a config value is a number or a boolean."""

from __future__ import annotations

import math
from typing import Any


class EENNError(ValueError):
    """Bad input (config key, file, data): the message is one sentence that names it."""


def is_number(value: Any, integer: bool = False) -> bool:
    """Whether ``value`` is a finite number (an int if ``integer``); a bool is not one, though
    Python counts it as an int."""
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)


def check_number(value: Any, key: str, minimum: float, strict: bool = False, integer: bool = False) -> Any:
    """``value`` if it is a finite number (an integer if ``integer``) above ``minimum`` (at or above
    it unless ``strict``); otherwise an EENNError naming ``key``."""
    if not is_number(value, integer) or value < minimum or (strict and value == minimum):
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise EENNError(f"{key} must be {'an integer' if integer else 'a number'} {bound}, got {value!r}.")
    return value


def check_flag(value: Any, key: str) -> bool:
    """``value`` if it is a boolean; otherwise an EENNError naming ``key`` (Hydra reads ``force=no``
    as the string 'no', which Python's ``bool`` and every ``if`` take as true)."""
    if not isinstance(value, bool):
        raise EENNError(f"{key} must be true or false, got {value!r}.")
    return value
