"""logger=tensorboard and logger=mlflow: a tiny training's metrics (per-exit accuracy among them),
its config and the cost table, read back from the event file and from the local MLflow store."""

from __future__ import annotations

import json

import pytest

from eenn.errors import EENNError
from eenn.tasks.train import train

TINY = [
    "data=digits",
    "exits=early",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "cost.latency=false",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One training, logged to TensorBoard and MLflow at once (and CSV, which both configs bring)."""
    from tests.api.conftest import compose_in

    root = tmp_path_factory.mktemp("loggers")
    cfg = compose_in("train", [*TINY, "logger=[tensorboard,mlflow]"], root, root / "run")
    metrics = train(cfg)
    return root, metrics


def test_tensorboard_event_files_hold_the_metrics_config_and_cost_table(logged):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    root, metrics = logged
    events = list((root / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no event file"
    mux = EventMultiplexer().AddRunsFromDirectory(str(root / "run" / "tensorboard"))
    mux.Reload()
    scalars, texts = {}, {}
    for run in mux.Runs():
        acc = mux.GetAccumulator(run)
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = acc.Scalars(tag)[-1].value
        for tag in acc.Tags()["tensors"]:
            if tag.endswith("text_summary"):
                texts[tag] = acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
    for name in metrics["exit_names"]:
        key = name.replace(".", "_")
        assert scalars[f"test/acc/{key}"] == pytest.approx(metrics["test_accuracy"][name], abs=1e-6)
        assert f"val/acc/{key}" in scalars
    assert "train/loss_epoch" in scalars
    table = texts["costs/text_summary"]
    assert "MMACs (cumulative)" in table and all(name in table for name in metrics["exit_names"])
    hparams = (root / "run" / "tensorboard" / "hparams.yaml").read_text()
    assert "cifar_resnet" in hparams and "max_epochs: 1" in hparams


def test_the_mlflow_store_holds_the_metrics_params_and_cost_table(logged):
    from mlflow import MlflowClient

    root, metrics = logged
    store = root / "outputs" / "mlflow"
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "eenn"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.data.tags["run_dir"] == str((root / "run").resolve())
    assert run.data.tags["app"] == "train"
    for name in metrics["exit_names"]:
        key = name.replace(".", "_")
        assert run.data.metrics[f"test/acc/{key}"] == pytest.approx(metrics["test_accuracy"][name])
        assert f"val/acc/{key}" in run.data.metrics
    assert run.data.params["backbone/name"] == "cifar_resnet" and run.data.params["trainer/max_epochs"] == "1"
    (artifact,) = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert artifact == "costs_table.json"
    table = json.loads((store / "artifacts" / run.info.run_id / "artifacts" / artifact).read_text())
    assert table["columns"][0] == "exit" and [r[0] for r in table["data"][:-1]] == metrics["exit_names"]


def test_a_missing_logger_package_is_named_with_its_extra(monkeypatch):
    import importlib.util

    from eenn.tasks import loggers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(EENNError, match=r"logger=tensorboard needs tensorboard: pip install 'eenn\[tensorboard\]'"):
        loggers.tensorboard_logger("/tmp/nowhere")
