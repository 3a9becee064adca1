"""Hydra command-line overrides built from values, quoted so that Hydra reads the value back as given.

A path is the common case: a sweep job's dir is named by its overrides
(``0_data=digits,seed=1``), and unquoted its ``=`` and ``,`` are read as override syntax. Every
override eenn or its benchmarks build from a value goes through :func:`override`
(``tests/test_structure.py`` checks it).

Hydra's quoted strings (override grammar, "Quoted values"): inside ``'...'`` a quote is escaped
with a backslash, and so is every backslash of a run that precedes a quote (or the closing one);
other backslashes are literal. Hydra leaves ``${...}`` in a quoted value for OmegaConf to
interpolate, so a literal ``${`` is written ``\\${`` (and the backslashes before it doubled).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

__all__ = ["override", "quote"]

_KEY = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.\-/@]*$")
_DICT_KEY = re.compile(r"^[A-Za-z_][\w\-]*$")
_INTERPOLATION = re.compile(r"(\\*)\$\{")  # OmegaConf: \${ is a literal ${, and \\ before ${ a backslash
_BACKSLASHES_BEFORE_QUOTE = re.compile(r"(\\+)(?='|$)")


def quote(text: str) -> str:
    """``text`` as a single-quoted Hydra string whose value is ``text`` exactly."""
    body = _BACKSLASHES_BEFORE_QUOTE.sub(lambda m: m[1] * 2, text)
    body = _INTERPOLATION.sub(lambda m: m[1] * 2 + "\\${", body.replace("'", "\\'"))
    return f"'{body}'"


def value(v: Any) -> str:
    """``v`` in Hydra's value syntax: strings and paths quoted, lists and dicts element by element."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        v = float(v)
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, (str, PurePath)):
        return quote(str(v))
    if isinstance(v, Mapping):
        bad = [k for k in v if not isinstance(k, str) or not _DICT_KEY.match(k)]
        if bad:
            raise ValueError(f"Hydra's dict keys are plain names; got {bad}")
        return "{" + ",".join(f"{k}:{value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, Sequence):
        return "[" + ",".join(value(x) for x in v) + "]"
    raise TypeError(f"no Hydra override syntax for a {type(v).__name__}: {v!r}")


def override(key: str, v: Any) -> str:
    """The override ``key=<v>`` that sets ``key`` to ``v`` as given (``+key`` / ``++key`` too)."""
    if not _KEY.match(key):
        raise ValueError(f"{key!r} is not a config key")
    return f"{key}={value(v)}"
