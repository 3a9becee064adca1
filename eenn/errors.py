"""Bad input: the one exception type eenn raises for it (the CLI prints its message alone), and
the check that a config value is a number."""

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
