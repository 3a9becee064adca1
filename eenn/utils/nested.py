"""Nested configs as flat ``{"a.b.c": leaf}`` dicts (plain Python: the run dirs' config checks and
eenn-compare's seed groups both read configs this way)."""

from __future__ import annotations

from typing import Any


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b.c": leaf}``."""
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
