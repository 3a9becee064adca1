"""The README's Python tour runs as written, on a tiny digits run."""

from __future__ import annotations

import pytest

from tests.api.readme import readme_block, with_paths


def test_the_readme_python_tour_runs(digits, capsys):
    code = with_paths(readme_block("test_readme.py"), digits.run, digits.fit)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102  (the README's own code)
    out, model, cheaper = scope["out"], scope["model"], scope["cheaper"]
    assert scope["logits"].shape == (len(out.classes), model.num_exits, len(model.class_names))
    assert cheaper.policy is scope["policy"] and cheaper.network is model.network
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("accuracy ") and "of the full cost" in printed[0]
    assert float(printed[1]) == pytest.approx(scope["eenn"].evaluate(scope["policy"], digits.run)["accuracy"])
