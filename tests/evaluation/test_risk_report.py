"""eenn-compare on risk-controlled and calibrated fits: risk-cost curves beside the uncertified
baseline, reliability diagrams and their tables in the report (synthetic predictions: seconds)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from eenn.evaluation.compare import risk_points
from eenn.evaluation.offline import evaluate
from eenn.evaluation.report import accuracy_table
from eenn.policies import ExitPolicy, build_policy
from eenn.rundir import TrainRun
from eenn.tasks.compare import compare
from eenn.tasks.fit import fit_run
from tests.policies.conftest import one_thread, run_dir  # noqa: F401
from tests.policies.test_fit_cli import fit_cfg

EPSILONS = (0.02, 0.05, 0.1)


@pytest.fixture
def compared(run_dir: Path, tmp_path: Path):  # noqa: F811
    sweep = tmp_path / "sweep"
    for i, eps in enumerate(EPSILONS):
        fit_run(
            fit_cfg(
                [f"run_dir={run_dir}", "policy=risk", f"risk.epsilon={eps}", "calibrate=true", "budget.fraction=1.0"]
            ),
            sweep / str(i),
        )
    fit_run(fit_cfg([f"run_dir={run_dir}", "policy=maxprob", "budget.fraction=0.7"]), sweep / "maxprob")
    return compare([sweep], [], tmp_path / "compare"), tmp_path / "compare", run_dir


def test_risk_points_put_each_certified_fit_beside_the_uncertified_baseline(compared) -> None:
    comp, _, run = compared
    points = risk_points(comp)
    assert [p["epsilon"] for p in points] == list(EPSILONS)  # one per risk fit; maxprob has none
    val, test = TrainRun(run).predictions("val"), TrainRun(run).predictions("test")
    for p in points:
        fit = next(f for f in comp.fits if f["fitted"].get("epsilon") == p["epsilon"])
        # calibrated: LTT calibrates on the 480 of 600 validation samples the temperatures were not fitted on
        assert p["loss"] == "drop" and p["calibrated"] and p["certified"] and p["calibration_size"] == 480
        assert fit["calibration"]["split"]["calibration_samples"] == 480
        assert p["test_risk"] == fit["test"]["risk"]["drop"]
        assert p["cost_saved"] == pytest.approx(1 - fit["test"]["avg_cost_fraction"])
        # the baseline: the same rule at the same validation risk, no test, same temperatures
        T = ExitPolicy.load(fit["policy_file"]).temperature
        base = build_policy("risk", epsilon=p["epsilon"], certify=False).fit(val, None, "flops", temperature=T)
        assert p["uncertified_threshold"] == base.info["threshold"]
        assert p["uncertified_test_risk"] == evaluate(base, test, "flops")["risk"]["drop"]
        assert p["uncertified_cost_saved"] >= p["cost_saved"]  # untested, it is never more cautious


def test_the_report_has_risk_cost_curves_reliability_diagrams_and_their_tables(compared) -> None:
    _, out, _ = compared
    assert (out / "risk_cost_train_run_drop_calibrated.png").is_file()
    assert (out / "reliability_train_run.png").is_file()
    html = (out / "report.html").read_text()
    assert "Risk control: realised test risk and cost saved at each ε" in html
    assert "Calibration: test ECE per exit before / after temperature scaling" in html
    assert 'alt="risk_cost_train_run_drop_calibrated"' in html and 'alt="reliability_train_run"' in html


def test_fits_of_one_policy_at_one_budget_each_keep_their_row(compared) -> None:
    # the three risk fits share budget 1.0 and differ in epsilon: each is a row of the by-budget
    # table, the results CSV and the report, named by it (not one cell that the last fit wins)
    comp, out, _ = compared
    header, rows = accuracy_table(comp)
    risk = [r for r in rows if r[1].startswith("risk")]
    assert [r[1] for r in risk] == [f"risk (epsilon={e})" for e in EPSILONS]
    acc = {r["settings"]: f"{100 * r['test_accuracy']:.2f}" for r in comp.rows if r["policy"] == "risk"}
    assert [r[header.index("1.00")] for r in risk] == [acc[f"epsilon={e}"] for e in EPSILONS]
    assert [r["settings"] for r in comp.rows if r["policy"] == "maxprob"] == [""]  # one fit: nothing to tell apart
    with open(out / "results.csv") as fh:
        assert sorted(r["settings"] for r in csv.DictReader(fh) if r["policy"] == "risk") == [
            f"epsilon={e}" for e in EPSILONS
        ]
    assert "risk (epsilon=0.05)" in (out / "report.html").read_text()
