"""The README's Python blocks that a test runs: found by the comment above them, with their
placeholder paths replaced by real ones."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
RUN, FIT = "outputs/train/runs/<run>", "outputs/fit/runs/<fit>"


def readme_block(test_file: str) -> str:
    """The python block under ``<!-- tested: tests/api/<test_file> ... -->``."""
    text = README.read_text()
    found = re.search(rf"<!-- tested: tests/api/{re.escape(test_file)}[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert found, f"README.md has no python block marked as tested by {test_file}"
    return found.group(1)


def with_paths(code: str, run: Path, fit: Path) -> str:
    assert RUN in code
    return code.replace(RUN, str(run)).replace(FIT, str(fit))
