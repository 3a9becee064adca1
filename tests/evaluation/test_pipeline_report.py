import csv
import json
import re
import shutil

import pytest

from eenn.tasks.compare import compare
from tests.evaluation.conftest import ALL_POLICIES, run_tiny_pipeline


def test_report_holds_every_policy_with_embedded_images_and_no_external_links(tiny_pipeline):
    html = (tiny_pipeline / "compare" / "report.html").read_text()
    for policy in ALL_POLICIES:
        assert policy in html, policy
    images = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(images) >= 3 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<link" not in html and "<script" not in html


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
    assert failed == {"maxprob_0.9999": "budget.fraction must be a finite positive number",
                      "eenet_unfinished": "no metrics.json (failed or unfinished)"}
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
    run_tiny_pipeline(out, ["pipeline.policies=[maxprob]", "pipeline.num_budgets=2", "pipeline.force=true"])
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
