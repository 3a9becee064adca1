"""eenn.load / predict / anytime / fit_policy / with_policy on a tiny digits run: the API answers as
the apps' own objects do (the engine, offline simulation, eenn-fit), and refuses bad input by name."""

from __future__ import annotations

import pytest
import torch

import eenn
from eenn.errors import EENNError
from eenn.policies.simulate import simulate
from eenn.rundir import FitRun, PipelineRun, TrainRun
from eenn.tasks.build import datamodule


@pytest.fixture(scope="module")
def model(digits):
    return eenn.load(digits.run, policy=digits.fit)


def test_predict_is_the_engine_and_agrees_with_offline_simulation(model, digits):
    run = TrainRun(digits.run)
    test = run.predictions("test")
    x, y = eenn.load_split(digits.run, "test")
    assert torch.equal(y, test.labels)  # the split in the order of the saved predictions

    out = model.predict(x, batch_size=64)
    assert out.classes.shape == out.exits.shape == out.cost.shape == (len(y),)
    assert out.logits.shape == (len(y), test.num_classes) and out.unit == "flops"
    offline, heads = simulate(FitRun(digits.fit).policy(), test.logits, test.labels)
    assert (out.exits == offline).double().mean() >= 0.99  # float ties between batch sizes aside
    assert torch.equal(out.heads[out.exits == offline], heads[out.exits == offline])
    # the realised cost of maxprob (every head up to the exit) is the exit's cost, per sample
    flops = torch.tensor(model.costs["flops"], dtype=torch.float64)
    assert torch.equal(out.cost, flops[out.exits])
    assert out.accuracy(y) == pytest.approx(FitRun(digits.fit).metrics()["test"]["accuracy"], abs=0.01)

    anytime = model.anytime(x, batch_size=100)
    assert anytime.shape == test.logits.shape
    torch.testing.assert_close(anytime, test.logits, atol=1e-4, rtol=1e-4)
    rows = torch.arange(len(y))
    torch.testing.assert_close(out.logits, anytime[rows, out.exits], atol=1e-4, rtol=1e-4)
    assert torch.equal(out.classes, out.logits.argmax(-1))


def test_what_the_model_says_about_itself(model, digits):
    metrics = TrainRun(digits.run).metrics()
    assert model.exit_names == metrics["exit_names"] and model.num_exits == 4
    assert model.costs["flops"] == metrics["costs_flops"] and "latency_ms" not in model.costs  # not measured
    assert model.class_names == [str(c) for c in range(10)] and model.input_shape == (1, 8, 8)
    assert model.policy.name == "maxprob" and "maxprob" in repr(model)
    # raw digits (uint8, or floats in [0, 1]) normalised as the data module does
    dm = datamodule(TrainRun(digits.run))
    dm.setup("test")
    raw = dm.test_set.x  # the digits' uint8 images (N, 1, 8, 8), as the data module holds them
    x, _ = eenn.load_split(digits.run, "test")
    assert raw.dtype == torch.uint8 and torch.equal(model.normalise(raw), x)
    torch.testing.assert_close(model.normalise(raw.float() / 255), x)
    torch.testing.assert_close(model.normalise(raw[:, 0]), x)  # (N, H, W): one channel


def test_fit_policy_is_eenn_fit(digits):
    fitted = eenn.fit_policy(digits.run, "maxprob", budget=0.5)
    saved = FitRun(digits.fit).policy()
    assert torch.equal(fitted.thresholds, saved.thresholds) and fitted.budget == saved.budget
    # from a predictions file or Predictions, the same
    val = TrainRun(digits.run).predictions("val")
    assert torch.equal(eenn.fit_policy(val, "maxprob", budget=0.5).thresholds, saved.thresholds)
    assert torch.equal(
        eenn.fit_policy(TrainRun(digits.run).predictions_file("val"), "maxprob", budget=0.5).thresholds,
        saved.thresholds,
    )
    # options and other policies; the summary eenn-fit writes
    entropy = eenn.fit_policy(digits.run, "entropy", budget=0.7, calibrate=True)
    assert entropy.temperature is not None and entropy.temperature.shape == (4,)
    summary = eenn.evaluate(entropy, digits.run)
    assert summary["avg_cost_fraction"] <= 0.7 + 0.05 and set(summary) >= {"accuracy", "exit_fractions", "confusion"}
    fixed = eenn.fit_policy(digits.run, "maxprob", budget=None, thresholds=[0.9, 0.9, 0.9])
    assert fixed.budget is None and fixed.thresholds.tolist()[:3] == pytest.approx([0.9, 0.9, 0.9])
    # out-of-range budgets are clamped as eenn-fit clamps them
    assert eenn.fit_policy(digits.run, "maxprob", budget=5.0).budget == pytest.approx(val.costs[-1].item())


def test_with_policy_shares_the_network_and_swaps_the_policy(model, digits):
    entropy = eenn.fit_policy(digits.run, "entropy", budget=0.8)
    other = model.with_policy(entropy)
    assert other.network is model.network and other.policy is entropy and model.policy.name == "maxprob"
    assert model.with_policy(FitRun(digits.fit).policy_file).policy.name == "maxprob"  # a policy file
    x, _ = eenn.load_split(digits.run, "val")
    assert other.predict(x[:50]).cost.mean() > 0


def test_a_pipeline_dir_loads_its_training_run(digits, tmp_path):
    # eenn.load takes a pipeline dir as eenn-infer does: its train/ run
    pipeline = tmp_path / "pipe"
    (pipeline / ".hydra").mkdir(parents=True)
    (pipeline / ".hydra" / "config.yaml").write_text("task_name: pipeline\n")
    (pipeline / PipelineRun.TRAIN).symlink_to(digits.run)
    assert eenn.load(pipeline).exit_names == TrainRun(digits.run).metrics()["exit_names"]


def test_bad_input_is_one_sentence_naming_it(model, digits, tmp_path):
    bare = eenn.load(digits.run)
    x, _ = eenn.load_split(digits.run, "test")
    cases = [
        (lambda: bare.predict(x), "has no exit policy"),
        (lambda: eenn.load(tmp_path / "nowhere"), "is not a directory"),
        (lambda: eenn.load(digits.fit), "is not an eenn-train"),
        (lambda: eenn.load(digits.run, policy=tmp_path / "none.safetensors"), "neither a policy file"),
        (lambda: eenn.load(digits.run, policy=digits.run), "holds no policy.safetensors"),
        (lambda: eenn.load(digits.run, device="tpu9"), "device='tpu9'"),
        (lambda: eenn.load(digits.run, checkpoint="middle"), "checkpoint='middle'"),
        (lambda: model.predict(x[:, :, :4]), r"inputs must have shape \(N, 1, 8, 8\)"),
        (lambda: model.predict((x * 50).to(torch.uint8)), "normalised float"),
        (lambda: model.predict(x, unit="latency_ms"), "unit='latency_ms'"),
        (lambda: model.with_policy(eenn.fit_policy(digits.run, "oracle", budget=0.5)), "reads the labels"),
        (lambda: eenn.fit_policy(TrainRun(digits.run).predictions("test"), "maxprob"), "test predictions"),
        (lambda: eenn.fit_policy(digits.run, "nosuch"), "nosuch"),
        (lambda: eenn.fit_policy(digits.run, "maxprob", budget=-1), "budget.fraction must be"),
        (lambda: eenn.fit_policy(digits.run, "maxprob", cost="joules"), "cost='joules'"),
        (lambda: eenn.load_split(digits.run, "train"), "split must be one of"),
    ]
    for call, message in cases:
        with pytest.raises(EENNError, match=message):
            call()
