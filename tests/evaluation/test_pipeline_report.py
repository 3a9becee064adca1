import csv
import json
import re
import shutil

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from eenn.cli.common import conf_dir
from eenn.tasks.compare import compare
from eenn.tasks.pipeline import experiment_jobs, fit_jobs
from tests.evaluation.conftest import ALL_POLICIES, run_tiny_pipeline


def test_report_holds_every_policy_with_embedded_images_and_no_external_links(tiny_pipeline):
    html = (tiny_pipeline / "compare" / "report.html").read_text()
    for policy in ALL_POLICIES:
        assert policy in html, policy
    images = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(images) >= 3 and all(src.startswith("data:image/png;base64,") for src in images)
    # the interactive figure's scripts are inline (plotly.js with them); nothing else may load
    assert not any("src=" in attrs for attrs in re.findall(r"<script([^>]*)>", html))
    outside = re.sub(r"<script[^>]*>.*?</script>", "", html, flags=re.S)
    assert not re.search(r'(src|href)="(https?:)?//', outside) and "<link" not in outside
    assert html.count("Plotly.newPlot") == 1  # the accuracy-vs-cost figure (FLOPs: latency is not measured)


def test_results_csv_has_a_row_per_fit(tiny_pipeline):
    with open(tiny_pipeline / "compare" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    fits = list((tiny_pipeline / "fit").glob("*/metrics.json"))
    assert len(rows) == len(fits) == 3 + 6 * 3  # static at each of 3 exits, 6 policies x 3 budgets
    assert {r["policy"] for r in rows} == set(ALL_POLICIES)
    for r in rows:
        fractions = json.loads(r["test_exit_fractions"])
        assert abs(sum(fractions) - 1) < 1e-5  # each rounded to 6 decimals
        assert r["model"] == "tiny" and r["training"] == "joint"


def test_a_failed_or_missing_run_is_reported_by_name(tiny_pipeline, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_pipeline / "fit", sweep)
    broken = sweep / "maxprob_0.9999"
    broken.mkdir()
    (broken / "error.json").write_text(json.dumps({"message": "budget.fraction must be a finite positive number"}))
    (sweep / "eenet_unfinished").mkdir()
    (sweep / "eenet_unfinished" / ".hydra").mkdir()
    comp = compare([str(sweep)], [], tmp_path / "cmp")
    failed = {f["run"].rsplit("/", 1)[-1]: f["reason"] for f in comp.failures}
    assert failed == {
        "maxprob_0.9999": "budget.fraction must be a finite positive number",
        "eenet_unfinished": "no metrics.json (failed or unfinished)",
    }
    html = (tmp_path / "cmp" / "report.html").read_text()
    assert "maxprob_0.9999" in html and "eenet_unfinished" in html


def test_rerun_skips_finished_steps_and_force_redoes_them(tiny_pipeline, capsys):
    stamp = (tiny_pipeline / "train" / "metrics.json").stat().st_mtime_ns
    fit_stamp = (tiny_pipeline / "fit" / "maxprob_1.0000" / "metrics.json").stat().st_mtime_ns
    run_tiny_pipeline(tiny_pipeline, ["pipeline.policies=[maxprob]"])
    out = capsys.readouterr().out
    assert "is complete, skipped" in out and "(3 done before)" in out
    assert (tiny_pipeline / "train" / "metrics.json").stat().st_mtime_ns == stamp
    assert (tiny_pipeline / "fit" / "maxprob_1.0000" / "metrics.json").stat().st_mtime_ns == fit_stamp


@pytest.mark.slow
def test_force_redoes_everything(tmp_path):
    out = tmp_path / "p"
    run_tiny_pipeline(out, ["pipeline.policies=[maxprob]", "pipeline.num_budgets=2", "wandb.enabled=false"])
    stamp = (out / "train" / "metrics.json").stat().st_mtime_ns
    assert not list((out / "fit").glob("*/wandb"))  # wandb.enabled=false reaches the fits
    run_tiny_pipeline(out, ["pipeline.policies=[maxprob]", "pipeline.num_budgets=2", "force=true"])
    assert (out / "train" / "metrics.json").stat().st_mtime_ns != stamp


def test_every_pipeline_fit_is_its_own_offline_wandb_run(tiny_pipeline):
    """The pipeline's wandb settings reach the fits: one offline run per fit dir, grouped by the pipeline's model."""
    fits = sorted(p.parent for p in (tiny_pipeline / "fit").glob("*/metrics.json"))
    assert fits
    for fit in fits:
        runs = list((fit / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, fit
        data = next(runs[0].glob("*.wandb")).read_bytes()
        assert b"tiny" in data and fit.name.rsplit("_", 1)[0].encode() in data


def _fit_policy(overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("fit", overrides=overrides)
    return OmegaConf.to_container(cfg.policy), OmegaConf.to_container(cfg.budget)


def test_pipeline_jobs_carry_their_settings_to_eenn_fit():
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(
            "pipeline",
            [
                "pipeline.policies=[static,entropy]",
                "+pipeline.policy_overrides.entropy.criterion=cross_entropy",
                "+pipeline.policy_overrides.entropy.thresholds=[0.5,0.25]",
            ],
        )
    jobs = dict(fit_jobs(cfg, [0.5, 1.0], num_exits=2))
    assert sorted(jobs) == ["entropy_0.5000", "entropy_1.0000", "static_exit0", "static_exit1"]
    assert _fit_policy(jobs["static_exit1"]) == (
        {"name": "static", "exit": 1},
        {"fraction": 1.0, "value": None, "point": None, "points": None},
    )
    policy, budget = _fit_policy(jobs["entropy_0.5000"])
    assert (
        policy == {"name": "entropy", "criterion": "cross_entropy", "thresholds": [0.5, 0.25]}
        and budget["fraction"] == 0.5
    )


def test_an_experiments_stage2_is_one_job_per_combination_of_its_sweep():
    def stage2(experiment):
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            return compose("pipeline", [f"experiment={experiment}"]).stage2

    deex = dict(experiment_jobs(stage2("deex_alexnet_cifar10_binary")))
    assert len(deex) == 11 and _fit_policy(deex["deex_p_d=0.7"])[0] == {"name": "deex", "p_d": 0.7, "p_tar": 0.9}
    bilevel = dict(experiment_jobs(stage2("bilevel_msdnet_cifar10")))
    policy, budget = _fit_policy(bilevel["maxprob_value=25000000.0"])
    assert policy == {"name": "maxprob", "thresholds": None} and budget == {
        "fraction": None,
        "value": 2.5e7,
        "point": None,
        "points": None,
    }
    (job,) = experiment_jobs(stage2("branchynet_alexnet_cifar10"))  # thresholds given, no sweep: one fit
    assert job[0] == "entropy" and _fit_policy(job[1])[0]["thresholds"] == [1.0e-4, 0.05]


def test_risk_is_fitted_once_at_its_ceiling_and_a_stale_failed_fit_does_not_fail_a_rerun(tmp_path, caplog):
    from eenn.rundir import FitRun, PipelineRun
    from tests.evaluation.conftest import run_tiny_pipeline

    out = tmp_path / "riskpipe"
    overrides = ["pipeline.policies=[maxprob,risk]", "+pipeline.policy_overrides.risk.epsilon=0.3"]
    comp = run_tiny_pipeline(out, overrides)
    fits = sorted(d.name for d in PipelineRun(out).fit_dir.iterdir())
    assert len(fits) == 4 and [f for f in fits if f.startswith("risk")] == ["risk_1.0000"]  # 3 maxprob budgets
    assert not comp.failures
    stale = FitRun(PipelineRun(out).fit_dir / "entropy_0.5000")
    stale.path.mkdir()
    stale.write_error(RuntimeError("an earlier run's failure"), ["policy=entropy"])
    comp = run_tiny_pipeline(out, overrides)
    assert comp.failures == []
    assert "no longer asks for, left out: entropy_0.5000" in caplog.text
