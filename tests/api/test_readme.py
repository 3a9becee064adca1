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


def test_the_api_notebook_runs_on_a_run(digits, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from tests.api.readme import README

    notebook = README.parent / "notebooks" / "python_api.ipynb"
    monkeypatch.setenv("EENN_RUN_DIR", str(digits.run))
    nb = nbformat.read(notebook, as_version=4)
    sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "from eenn." not in sources and "import eenn." not in sources  # the API alone
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the accuracy-vs-cost plot
    text = "".join(o.get("text", "") for o in outputs)
    assert "identical predictions: True" in text and "maxprob at budget 0.6: accuracy" in text
