"""Every JSON the READMEs quote is in benchmarks/results/, says which code made it, and that code
is in this checkout's history (so a number can be traced to a commit of the code it measured)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [p for p in (REPO / "README.md", REPO / "benchmarks" / "README.md", REPO / "CONTRIBUTING.md") if p.is_file()]
QUOTED = sorted({m for doc in DOCS for m in re.findall(r"benchmarks/results/[\w.-]+\.json", doc.read_text())})


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


def test_the_readmes_quote_results():
    assert len(QUOTED) >= 10, QUOTED  # the finder finds what the READMEs name


@pytest.mark.parametrize("name", QUOTED)
def test_a_quoted_result_exists_and_its_commit_is_in_the_history(name):
    path = REPO / name
    assert path.is_file(), f"{name} is quoted but missing"
    code = json.loads(path.read_text()).get("code")
    assert isinstance(code, dict) and code.get("commit"), f"{name} records no commit"
    if _git("rev-parse", "HEAD").returncode != 0:
        pytest.skip("not a git checkout")
    if _git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        pytest.skip("a shallow clone does not hold the history to check against")
    assert _git("merge-base", "--is-ancestor", code["commit"], "HEAD").returncode == 0, (
        f"{name} was made on {code['commit']}, which is not an ancestor of HEAD"
    )
