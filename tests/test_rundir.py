"""Run dirs as objects: what they name, how they refuse, and the one checkpoint loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from eenn.checkpoints import load_weights
from eenn.errors import EENNError
from eenn.models import build_multi_exit
from eenn.policies.synthetic import synthetic_predictions
from eenn.rundir import FitRun, PipelineRun, RunDir, TrainRun, failed_jobs, fit_runs

RESNET8 = {"name": "cifar_resnet", "depth": 8}


def _net(classes: int = 4):
    return build_multi_exit(RESNET8, {"at": "stages"}, classes, (3, 16, 16))


def test_a_stage1_run_names_its_model_as_comparisons_do(tmp_path):
    assert TrainRun(tmp_path / "runs" / "r1").name == "r1"
    pipe = PipelineRun(tmp_path / "demo")
    assert pipe.train.name == "demo" and pipe.fit("maxprob_0.5").path == tmp_path / "demo" / "fit" / "maxprob_0.5"
    # two sweeps with the same override name their jobs alike: the sweep dir tells the models apart
    names = []
    for sweep in ("2026-11-28_10-00-00_a1b2c3", "2026-11-28_10-00-00_d4e5f6"):
        (tmp_path / sweep / "0_backbone=resnet20").mkdir(parents=True)
        (tmp_path / sweep / "multirun.yaml").write_text("{}")
        names.append(TrainRun(tmp_path / sweep / "0_backbone=resnet20").name)
    assert names == ["2026-11-28_10-00-00_a1b2c3/0_backbone=resnet20", "2026-11-28_10-00-00_d4e5f6/0_backbone=resnet20"]


def test_predictions_round_trip_and_the_run_holding_a_file(tmp_path):
    run = TrainRun(tmp_path / "run")
    assert not run.has_predictions()
    for split in ("val", "test"):
        run.write_predictions(synthetic_predictions(20, seed=0, split=split))
    assert run.has_predictions() and run.predictions("test").split == "test"
    assert TrainRun.holding(run.predictions_file("val")).path == run.path.resolve()
    loose = tmp_path / "elsewhere" / "val.safetensors"
    assert TrainRun.holding(loose).path == loose.parent.resolve()
    with pytest.raises(EENNError, match="lacks .*: is it an eenn-train run dir"):
        TrainRun(tmp_path / "empty").predictions("val")


def test_missing_files_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = TrainRun(tmp_path)
    with pytest.raises(EENNError, match=r"checkpoint='best': .* does not exist"):
        run.checkpoint("best")
    with pytest.raises(EENNError, match=r"ckpt_path='/no/such.ckpt' does not exist"):
        run.resume_checkpoint("/no/such.ckpt")
    with pytest.raises(EENNError, match=r"ckpt_path=last: .* does not exist, so there is nothing to resume"):
        run.resume_checkpoint("last")
    monkeypatch.setenv("SLURM_JOB_ID", "3")
    assert run.resume_checkpoint("last") is None  # a cluster job's first start: nothing to resume yet
    with pytest.raises(EENNError, match="has no costs"):
        run.costs()
    with pytest.raises(EENNError, match="is not the run dir of an eenn app"):
        run.config()


def test_the_one_loader_loads_a_checkpoints_network_and_refuses_another_models(tmp_path):
    torch.manual_seed(0)
    net = _net()
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"network.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    other = _net()
    load_weights(other, ckpt, "checkpoint", prefix="network.")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    with pytest.raises(EENNError, match=r"checkpoint=.* does not fit this model \(.* differ in shape"):
        load_weights(_net(classes=7), ckpt, "checkpoint", prefix="network.")
    (tmp_path / "cut.ckpt").write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(EENNError, match="is not a readable checkpoint"):
        load_weights(other, tmp_path / "cut.ckpt", "checkpoint", prefix="network.")


def test_configs_saved_before_the_registry_keys_were_name_read_as_today(tmp_path):
    run = TrainRun(tmp_path)
    run.config_file.parent.mkdir()
    OmegaConf.save(
        OmegaConf.create(
            {"backbone": {"family": "timm", "name": "resnet18"}, "exits": {"at": "stages", "head": {"type": "linear"}}}
        ),
        run.config_file,
    )
    cfg = run.config()
    assert OmegaConf.to_container(cfg.backbone) == {"model": "resnet18", "name": "timm"}
    assert cfg.exits.head.name == "linear" and "type" not in cfg.exits.head


def test_sweep_jobs_finished_failed_and_unfinished(tmp_path):
    done, failed, started = (FitRun(tmp_path / n) for n in ("0_a", "1_b", "2_c"))
    done.write_metrics({"policy": "maxprob"})
    try:
        raise EENNError("budget.fraction must be a finite positive number, got -1.")
    except EENNError as exc:
        failed.write_error(exc, ["budget.fraction=-1"])
    (started.path / ".hydra").mkdir(parents=True)
    (tmp_path / "not_a_job").mkdir()
    assert [r.path.name for r in fit_runs(tmp_path)] == ["0_a", "1_b", "2_c"]
    assert [r.path for r in fit_runs(done.path)] == [done.path]  # a fit run dir itself
    assert failed_jobs(tmp_path) == ["1_b"]
    assert failed.failure().startswith("budget.fraction must be") and "no metrics" in started.failure()
    error = json.loads(failed.error_file.read_text())
    assert error["type"] == "EENNError" and error["traceback"] == "" and error["overrides"] == ["budget.fraction=-1"]
    failed.clear_error()
    assert not failed.failed()


def test_a_refused_job_leaves_no_run_dir_unless_it_holds_more(tmp_path):
    bare = RunDir(tmp_path / "bare")
    (bare.path / ".hydra").mkdir(parents=True)
    (bare.path / "train.log").write_text("")
    bare.remove_if_only_hydra_files()
    assert not bare.path.exists()
    kept = RunDir(tmp_path / "kept")
    (kept.path / "checkpoints").mkdir(parents=True)
    kept.remove_if_only_hydra_files()
    assert kept.path.is_dir()


def test_pipeline_results_parse_the_numbers(tmp_path: Path):
    pipe = PipelineRun(tmp_path)
    with pytest.raises(EENNError, match="does not exist"):
        pipe.results()
    pipe.compare.path.mkdir()
    pipe.compare.results_file.write_text(
        "policy,budget_fraction,budget,val_accuracy,test_accuracy,val_avg_cost,test_avg_cost,test_exit_fractions\n"
        'maxprob,0.5,1.0,0.9,0.8,1.0,1.0,"[0.5, 0.5]"\n'
    )
    (row,) = pipe.results()
    assert row["test_accuracy"] == 0.8 and row["test_exit_fractions"] == [0.5, 0.5]


def test_a_figure_of_a_long_model_name_fits_a_file_name(tmp_path):
    from eenn.rundir import CompareRun

    run = CompareRun(tmp_path)
    long_a, long_b = "sweep/0_" + "trainer.max_epochs=1," * 20 + "a", "sweep/0_" + "trainer.max_epochs=1," * 20 + "b"
    a, b = run.figure_file(f"confusion_{long_a}"), run.figure_file(f"confusion_{long_b}")
    assert a != b and len(a.name) <= 204 and a.name.startswith("confusion_sweep_0_trainer.max_epochs=1,")
    a.write_bytes(b"png")  # the file system takes it
    assert run.figure_file("confusion_tiny").name == "confusion_tiny.png"  # short names unchanged
