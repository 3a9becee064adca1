"""The report's interactive accuracy-vs-cost figure (Plotly), beside the static PNGs.

One figure per cost unit, on the axes of :func:`eenn.evaluation.plots.accuracy_vs_cost`: per model,
a curve per policy (the realised test cost and accuracy of each fit), each exit alone (the static,
anytime points) and the oracle ceiling; and, where a comparison has groups of seeds, each group's
mean over its seeds with its 95 % CI as a band. Hovering a point gives its numbers; a legend entry
hides or shows its curve (a band goes with its mean). plotly.js is embedded in the page itself, so
the report still opens from disk with no network.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

from eenn.evaluation.compare import Comparison, GroupStat, Model, per_exit, policy_label
from eenn.evaluation.plots import _scale
from eenn.policies import budget_ceiling, policy_class

#: the hover text of a point: its accuracy and cost
POINT = "test accuracy %{y:.2f} %<br>cost %{x:.4g}<extra></extra>"
#: Plotly's own colours, named here so that a seed group's band takes its line's colour
COLOURS = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880", "#FF97FF", "#FECB52")
HOVER = (
    "<b>%{customdata[0]}</b><br>test accuracy %{y:.2f} %<br>average cost %{x:.4g}<br>"
    "budget %{customdata[1]}<br>val accuracy %{customdata[2]}<br>exit fractions %{customdata[3]}<extra></extra>"
)


def _name(model: Model, what: str, many: bool) -> str:
    return f"{model.name} · {what}" if many else what


def _model_traces(
    comp: Comparison, model: Model, unit: str, div: float, many: bool, palette: Iterator[str]
) -> list[go.Scatter]:
    rows = [r for r in comp.rows if r["model"] == model.name and r["cost_unit"] == unit and not per_exit(r)]
    by_policy: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_policy[policy_label(r)].append(r)
    traces = []
    for policy, pts in sorted(by_policy.items()):
        pts = sorted(pts, key=lambda r: r["test_avg_cost"])
        ceiling = not policy_class(pts[0]["policy"]).online  # it reads the labels: a ceiling, not a policy
        data = [
            [
                policy,
                f"{r['budget_fraction']:.3f} of the full cost",
                f"{100 * r['val_accuracy']:.2f} %",
                ", ".join(f"{f:.2f}" for f in json.loads(r["test_exit_fractions"])),
            ]
            for r in pts
        ]
        style = (
            {"line": {"color": "black", "dash": "dash"}, "mode": "lines+markers", "marker": {"size": 4}}
            if ceiling
            else {"line": {"color": next(palette)}, "mode": "lines+markers"}
        )
        traces.append(
            go.Scatter(
                x=[r["test_avg_cost"] / div for r in pts],
                y=[100 * r["test_accuracy"] for r in pts],
                name=_name(model, policy, many),
                legendgroup=f"{model.name}/{policy}",
                customdata=data,
                hovertemplate=HOVER,
                **style,
            )
        )
    static = model.static_points(unit)
    traces.append(
        go.Scatter(
            x=[p["avg_cost"] / div for p in static],
            y=[100 * p["accuracy"] for p in static],
            mode="markers",
            name=_name(model, "each exit alone (static)", many),
            marker={"symbol": "star", "size": 14, "color": "crimson"},
            customdata=[[p["exit"]] for p in static],
            hovertemplate="<b>exit %{customdata[0]}</b> alone<br>" + POINT,
        )
    )
    if budget_ceiling() not in by_policy:
        oracle = model.oracle_curve(unit)
        traces.append(
            go.Scatter(
                x=[p["avg_cost"] / div for p in oracle],
                y=[100 * p["accuracy"] for p in oracle],
                mode="lines",
                name=_name(model, "oracle ceiling", many),
                line={"color": "grey", "dash": "dot"},
                hovertemplate="<b>oracle</b> (reads the labels)<br>" + POINT,
            )
        )
    return traces


def _seed_traces(stats: list[GroupStat], div: float, palette: Iterator[str]) -> list[go.Scatter]:
    """Per (group, policy) of more than one seed: the mean over seeds and its 95 % CI as a band."""
    curves: dict[tuple[str, str], list[GroupStat]] = defaultdict(list)
    for g in stats:
        curves[(g.group, g.policy)].append(g)
    traces = []
    for (group, policy), pts in sorted(curves.items()):
        pts.sort(key=lambda g: g.mean_test_avg_cost)
        if max(g.accuracy.n for g in pts) < 2:
            continue  # one seed: no spread to draw (the report's Seeds table says so)
        colour, key = next(palette), f"seeds/{group}/{policy}"
        x = [g.mean_test_avg_cost / div for g in pts]
        n = "/".join(str(v) for v in sorted({g.accuracy.n for g in pts}))
        band = [(g.accuracy.ci_low, g.accuracy.ci_high) for g in pts]
        if all(lo is not None and hi is not None for lo, hi in band):
            traces.append(
                go.Scatter(
                    x=x + x[::-1],
                    y=[100 * hi for _, hi in band] + [100 * lo for lo, _ in band][::-1],
                    fill="toself",
                    fillcolor=colour,
                    opacity=0.18,
                    line={"width": 0},
                    mode="lines",
                    legendgroup=key,
                    showlegend=False,
                    name=f"{group} · {policy}: 95 % CI",
                    hoverinfo="skip",
                )
            )
        data = [
            [
                f"{group} · {policy}",
                f"{g.requested_fraction:.3f}",
                g.accuracy.n,
                "" if g.accuracy.ci_low is None else f"[{100 * g.accuracy.ci_low:.2f}, {100 * g.accuracy.ci_high:.2f}]",
            ]
            for g in pts
        ]
        traces.append(
            go.Scatter(
                x=x,
                y=[100 * g.accuracy.mean for g in pts],
                mode="lines+markers",
                name=f"{group} · {policy} (seeds, n={n})",
                legendgroup=key,
                line={"color": colour, "width": 2.5},
                customdata=data,
                hovertemplate="<b>%{customdata[0]}</b><br>mean test accuracy %{y:.2f} % over %{customdata[2]} seeds<br>"
                "95 % CI %{customdata[3]}<br>mean cost %{x:.4g}<br>budget %{customdata[1]}<extra></extra>",
            )
        )
    return traces


def accuracy_cost_figure(comp: Comparison, unit: str) -> go.Figure:
    """Test accuracy against realised average cost in ``unit``, every model of the comparison on one
    axes (see the module docstring)."""
    models = [
        m for m in comp.models.values() if any(r["model"] == m.name and r["cost_unit"] == unit for r in comp.rows)
    ]
    stats = [g for g in comp.group_stats if g.cost_unit == unit]
    costs = [r["test_avg_cost"] for r in comp.rows if r["cost_unit"] == unit]
    costs += [p["avg_cost"] for m in models for p in m.static_points(unit)]
    _, label = _scale(unit, costs)
    div = 1e6 if "millions" in label else 1.0
    fig, palette = go.Figure(), itertools.cycle(COLOURS)  # one curve, one colour, across the models
    for m in models:
        fig.add_traces(_model_traces(comp, m, unit, div, len(models) > 1, palette))
    fig.add_traces(_seed_traces(stats, div, palette))
    fig.update_layout(
        title=f"Test accuracy vs average cost ({unit})",
        xaxis_title=label,
        yaxis_title="test accuracy (%)",
        hovermode="closest",
        template="plotly_white",
        height=560,
        legend={"title": {"text": "click to hide / show"}},
        margin={"l": 60, "r": 20, "t": 60, "b": 60},
    )
    return fig


def interactive_html(comp: Comparison) -> str:
    """The figures of every cost unit as HTML to place in the report, plotly.js inline in the first
    (no request leaves the page); "" when the comparison has no rows."""
    units = sorted({r["cost_unit"] for r in comp.rows})
    return "\n".join(
        pio.to_html(
            accuracy_cost_figure(comp, unit),
            include_plotlyjs=i == 0,
            full_html=False,
            div_id=f"accuracy-vs-cost-{unit}",
            config={"displaylogo": False, "responsive": True},
        )
        for i, unit in enumerate(units)
    )
