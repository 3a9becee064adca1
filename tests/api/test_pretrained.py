"""save_pretrained / from_pretrained: a self-contained model dir that loads with no run dir and no
Hydra and answers as the run's model does; its model card holds the run's own numbers."""

from __future__ import annotations

import json
import stat

import pytest
import torch

import eenn
from eenn.api import FORMAT
from eenn.card import CARD_BUDGETS
from eenn.errors import EENNError
from eenn.rundir import FitRun, TrainRun


@pytest.fixture(scope="module")
def saved(digits, tmp_path_factory):
    model = eenn.load(digits.run, policy=digits.fit)
    entropy = eenn.fit_policy(digits.run, "entropy", budget=0.7)
    out = tmp_path_factory.mktemp("pretrained") / "digits-resnet20"
    assert model.save_pretrained(out, policies={"entropy70": entropy}) == out
    return model, out


def test_a_model_dir_holds_everything_and_nothing_half_written(saved):
    _, out = saved
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == [
        "README.md",
        "config.json",
        "costs.json",
        "metrics.json",
        "model.safetensors",
        "policies/entropy70.safetensors",
        "policies/maxprob.safetensors",
    ]
    assert not list(out.parent.glob(f".{out.name}.*"))  # the temporary dir was renamed into place
    for p in out.rglob("*"):  # shareable: not the private modes of temporary files
        assert p.stat().st_mode & stat.S_IROTH, p
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == FORMAT and config["eenn_version"] == eenn.__version__
    assert config["backbone"] == {"name": "cifar_resnet", "depth": 20, "shortcut": "A"}
    assert config["policy"] == "maxprob" and config["policies"] == ["entropy70", "maxprob"]
    assert config["train_config"]["trainer"]["max_epochs"] == 1 and "root" not in config["train_config"]["data"]


def test_from_pretrained_predicts_exactly_as_the_run(saved, digits):
    model, out = saved
    loaded = eenn.from_pretrained(out)
    assert (
        loaded.run_dir is None
        and loaded.policy.name == "maxprob"
        and sorted(loaded.policies) == ["entropy70", "maxprob"]
    )
    assert loaded.costs == model.costs and loaded.exit_names == model.exit_names
    assert loaded.class_names == model.class_names and loaded.config["normalisation"] == model.config["normalisation"]
    x, _ = eenn.load_split(digits.run, "test")
    a, b = model.predict(x), loaded.predict(x)
    for field in ("classes", "exits", "logits", "cost", "heads"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(model.anytime(x), loaded.anytime(x))
    c = loaded.with_policy("entropy70").predict(x)
    assert loaded.with_policy("entropy70").policy.name == "entropy" and c.cost.mean() != b.cost.mean()
    assert eenn.from_pretrained(out, policy=None).policy is None
    assert eenn.from_pretrained(out, policy="entropy70").policy.name == "entropy"
    # a loaded model dir saves again, its card unchanged; a policy added since is listed, unscored
    again = out.parent / "again"
    loaded.save_pretrained(again)
    assert (again / "README.md").read_text() == (out / "README.md").read_text()
    loaded.save_pretrained(
        out.parent / "more", policies={"patience": eenn.fit_policy(digits.run, "patience", budget=0.8)}
    )
    more = (out.parent / "more" / "README.md").read_text()
    assert "| patience | patience | flops | — | — | — | — |" in more and more.count("| entropy70 |") == 1


def _table(card: str, title: str) -> list[list[str]]:
    """The rows of the markdown table under ``## title`` (header and rule dropped)."""
    section = card.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines() if line.startswith("|")
    ]
    return rows[2:]


def test_the_model_card_holds_the_runs_numbers(saved, digits):
    _, out = saved
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: eenn\n") and "# cifar_resnet with 4 exits on digits" in card
    metrics = TrainRun(digits.run).metrics()
    rows = _table(card, "Per-exit accuracy and cost")
    assert [r[0] for r in rows] == metrics["exit_names"]
    for r, name, flops in zip(rows, metrics["exit_names"], metrics["costs_flops"]):
        assert float(r[2]) == flops  # the flops column, whole
        assert r[1] == f"{flops / metrics['costs_flops'][-1]:.4f}"
        assert (
            r[-2] == f"{100 * metrics['val_accuracy'][name]:.2f}"
            and r[-1] == f"{100 * metrics['test_accuracy'][name]:.2f}"
        )
    # accuracy at 25/50/75 % of the full cost: maxprob fitted on validation; at 0.5 it is eenn-fit's own result
    budgets = _table(card, "Accuracy at 25/50/75 % of the full cost")
    assert [float(r[0]) for r in budgets] == list(CARD_BUDGETS)
    fit = FitRun(digits.fit).metrics()
    half = budgets[CARD_BUDGETS.index(0.5)]
    assert (
        half[1] == "maxprob"
        and half[3] == f"{100 * fit['test']['accuracy']:.2f}"
        and half[2] == f"{100 * fit['val']['accuracy']:.2f}"
    )
    saved_policies = {r[0]: r for r in _table(card, "Saved exit policies")}
    assert saved_policies["maxprob"][5] == f"{100 * fit['test']['accuracy']:.2f}"
    for text in ("dataset: `digits`", "(1, 8, 8)", "## Training config", '"max_epochs": 1', f"eenn {eenn.__version__}"):
        assert text in card, text


def test_budgets_below_the_first_exit_are_marked_not_invented(digits, tmp_path):
    from eenn.api import evaluate, fit_policy
    from eenn.card import card_metrics

    first = TrainRun(digits.run).metrics()["costs_flops"][0] / TrainRun(digits.run).metrics()["costs_flops"][-1]
    m = card_metrics(TrainRun(digits.run), {}, fit=fit_policy, score=evaluate)
    for b in m["budgets"]:
        assert (b["test_accuracy"] is None) == (b["fraction"] < first)
        if b["test_accuracy"] is not None:
            assert b["test_cost_fraction"] <= b["fraction"] + 0.05


def test_bad_input_is_one_sentence_naming_it(saved, digits, tmp_path):
    model, out = saved
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "costs.json"):
        (broken / f).write_bytes((out / f).read_bytes())
    (broken / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:100])
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((out / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "num_classes": 3, "policies": []}))
    (other / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({**cfg, "format": "eenn.pretrained/0"}))
    cases = [
        (lambda: model.save_pretrained(tmp_path / "full"), "not an empty directory"),
        (
            lambda: model.save_pretrained(tmp_path / "x", policies={"bad": tmp_path / "none.safetensors"}),
            "neither a policy",
        ),
        (lambda: model.save_pretrained(tmp_path / "x", push_to_hub=True), "needs repo_id"),
        (lambda: eenn.from_pretrained(broken), "model weights .* not a readable safetensors file"),
        (lambda: eenn.from_pretrained(other), "do not fit the network config.json describes"),
        (lambda: eenn.from_pretrained(old), "has format 'eenn.pretrained/0'"),
        (lambda: eenn.from_pretrained(out, policy="nosuch"), "nor a policy saved with the model"),
        # offline (the tests set HF_HUB_OFFLINE=1): a Hub id is refused in one sentence, no network call
        (
            lambda: eenn.from_pretrained("someone/no-such-model"),
            "not a local directory nor in the Hugging Face Hub's cache",
        ),
        (lambda: model.push_to_hub("someone/digits"), "cannot upload to 'someone/digits' while offline"),
    ]
    for call, message in cases:
        with pytest.raises(EENNError, match=message):
            call()
    assert not (tmp_path / "x").exists()  # a refused save leaves nothing
