"""The report's interactive accuracy-vs-cost figure: what it draws, on a synthetic comparison with
seed groups (the tiny pipeline has one seed), and that the page carries plotly.js itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from eenn.evaluation.compare import Comparison, Model, group_seeds, seed_statistics
from eenn.evaluation.interactive import accuracy_cost_figure, interactive_html
from eenn.evaluation.report import write_report
from eenn.policies.synthetic import synthetic_predictions


def _comparison() -> Comparison:
    """joint and bilevel, three seeds each; maxprob and oracle_budget rows at two budgets."""
    comp = Comparison()
    for training, base in (("joint", 0.80), ("bilevel", 0.82)):
        for seed in range(3):
            name = f"{training}_s{seed}"
            preds = synthetic_predictions(200, seed=seed, split="test")
            comp.models[name] = Model(
                name,
                Path(f"/runs/{name}"),
                training,
                preds,
                preds,
                {"seed": seed, "training._target_": f"eenn.training.{training}"},
            )
            for policy, lift in (("maxprob", 0.0), ("oracle_budget", 0.1)):
                for fraction in (0.5, 0.8):
                    acc = base + lift + fraction / 10 + 0.01 * seed
                    comp.rows.append(
                        {
                            "model": name,
                            "training": training,
                            "policy": policy,
                            "settings": "",
                            "requested_fraction": fraction,
                            "budget_fraction": fraction,
                            "budget": fraction,
                            "cost_unit": "flops",
                            "val_accuracy": acc,
                            "test_accuracy": acc,
                            "val_avg_cost": fraction * 1e3,
                            "test_avg_cost": fraction * 1e3,
                            "test_exit_fractions": json.dumps([0.5, 0.3, 0.2]),
                            "fit_seconds": 0.1,
                            "run": f"/fits/{name}_{policy}_{fraction}",
                        }
                    )
    group_seeds(comp)
    seed_statistics(comp, "joint")
    return comp


def test_the_figure_draws_policies_exits_ceilings_and_seed_bands():
    comp = _comparison()
    fig = accuracy_cost_figure(comp, "flops")
    names = [t.name for t in fig.data]
    # every model's policy curve, its exits alone, and the oracle it was fitted with (no second oracle curve)
    assert "joint_s0 · maxprob" in names and "bilevel_s2 · oracle_budget" in names
    assert "joint_s1 · each exit alone (static)" in names and not any("oracle ceiling" in n for n in names)
    curve = next(t for t in fig.data if t.name == "joint_s0 · maxprob")
    assert list(curve.y) == pytest.approx([85.0, 88.0]) and list(curve.x) == [500.0, 800.0]
    assert "test accuracy %{y:.2f}" in curve.hovertemplate and curve.customdata[0][0] == "maxprob"
    assert next(t for t in fig.data if t.name == "joint_s0 · oracle_budget").line.dash == "dash"  # a ceiling
    # the seed groups: a mean over seeds and its CI band, toggled together from one legend entry
    for group in ("joint", "bilevel"):
        mean = next(t for t in fig.data if t.name.startswith(f"{group} · maxprob (seeds, n=3)"))
        band = next(t for t in fig.data if t.name == f"{group} · maxprob: 95 % CI")
        assert band.fill == "toself" and band.legendgroup == mean.legendgroup and band.showlegend is False
        stat = next(
            g for g in comp.group_stats if g.group == group and g.policy == "maxprob" and g.requested_fraction == 0.5
        )
        assert mean.y[0] == 100 * stat.accuracy.mean and 100 * stat.accuracy.ci_high in band.y
        assert 100 * stat.accuracy.ci_low in band.y and stat.accuracy.ci_low < stat.accuracy.mean


def test_one_seed_draws_no_band_and_a_model_alone_gets_its_oracle():
    comp = _comparison()
    only = "joint_s0"
    comp.rows = [r for r in comp.rows if r["model"] == only and r["policy"] == "maxprob"]
    comp.models = {only: comp.models[only]}
    group_seeds(comp)
    seed_statistics(comp)
    names = [t.name for t in accuracy_cost_figure(comp, "flops").data]
    assert names == ["maxprob", "each exit alone (static)", "oracle ceiling"]  # one model: no model prefix


def test_the_report_embeds_plotly_once_and_loads_nothing(tmp_path):
    comp = _comparison()
    html = interactive_html(comp)
    assert html.count('id="accuracy-vs-cost-flops"') == 1
    write_report(comp, [], tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    scripts = re.findall(r"<script([^>]*)>", page)
    assert scripts and not any("src=" in s for s in scripts)  # every script inline
    assert page.count("Plotly.newPlot") == 1 and len(page) > 3_000_000  # plotly.js itself is in the page
    outside = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.S)
    assert not re.search(r'(src|href)="(https?:)?//', outside) and "<link" not in outside
