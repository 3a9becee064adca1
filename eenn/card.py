"""The model card of a model dir (:meth:`eenn.api.EarlyExitModel.save_pretrained`): what the numbers
are, taken from the stage-1 run and never re-measured by hand.

:func:`card_metrics` collects them from the run dir: per exit its cost and its validation and test
accuracy (the run's metrics), and the test accuracy at 25/50/75 % of the full cost of
MSDNet's max-probability rule fitted on the run's validation predictions (the budgets below the
first exit's cost are marked so), plus each saved policy's accuracy on both splits.
:func:`model_card` renders them with the model config as the dir's ``README.md``, with the
metadata header the Hugging Face Hub reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from eenn.policies.base import ExitPolicy

#: the budgets (fractions of the full model's cost) the card reports accuracy at
CARD_BUDGETS = (0.25, 0.5, 0.75)
#: the policy fitted at those budgets: cheap to fit, and every paper's baseline
CARD_POLICY = "maxprob"


def card_metrics(
    run: Any,
    policies: Mapping[str, ExitPolicy],
    fit: Callable[..., ExitPolicy],
    score: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """A finished stage-1 run's numbers for its model card (see the module docstring). ``run`` is
    its run-dir object; ``fit`` and ``score`` are :func:`eenn.api.fit_policy` and
    :func:`eenn.api.evaluate`, passed in so the card does not import the API that renders it."""
    m = run.metrics()
    val, test = run.predictions("val"), run.predictions("test")
    costs = run.costs()
    units = [u for u in ("flops", "macs", "params", "latency_ms") if getattr(costs.exits[0], u, None) is not None]
    full = costs.per_exit("flops")[-1]
    per_exit = [
        {
            "exit": name,
            "cost_fraction": costs.per_exit("flops")[k] / full,
            **{u: costs.per_exit(u)[k] for u in units},
            "val_accuracy": m["val_accuracy"][name],
            "test_accuracy": m["test_accuracy"][name],
        }
        for k, name in enumerate(m["exit_names"])
    ]
    first = per_exit[0]["cost_fraction"]
    budgets = []
    for fraction in CARD_BUDGETS:
        row: dict[str, Any] = {"fraction": fraction, "policy": CARD_POLICY}
        if fraction < first:
            row.update(
                val_accuracy=None,
                test_accuracy=None,
                test_cost_fraction=None,
                note=f"below the first exit's cost ({first:.3f} of the full cost)",
            )
        else:
            p = fit(val, CARD_POLICY, budget=fraction, cost="flops")
            s_val, s_test = score(p, val, unit="flops"), score(p, test, unit="flops")
            row.update(
                val_accuracy=s_val["accuracy"],
                test_accuracy=s_test["accuracy"],
                test_cost_fraction=s_test["avg_cost_fraction"],
            )
        budgets.append(row)
    fitted = []
    for name, p in sorted(policies.items()):
        unit = p.cost_unit or val.cost_unit
        s_val, s_test = score(p, val, unit=unit), score(p, test, unit=unit)
        fitted.append(
            {
                "name": name,
                "policy": p.name,
                "hparams": p.hparams(),
                "cost_unit": unit,
                "budget_fraction": None if p.budget is None else p.budget / float(val.costs_in(unit)[-1]),
                "val_accuracy": s_val["accuracy"],
                "test_accuracy": s_test["accuracy"],
                "test_cost_fraction": s_test["avg_cost_fraction"],
            }
        )
    return {
        "stage1": {k: m.get(k) for k in ("data", "training", "epochs", "num_classes", "code")},
        "samples": {"val": val.num_samples, "test": test.num_samples},
        "per_exit": per_exit,
        "budgets": budgets,
        "policies": fitted,
    }


def unscored(name: str, policy: ExitPolicy) -> dict[str, Any]:
    """A saved policy's card row where no predictions are at hand to score it."""
    return {
        "name": name,
        "policy": policy.name,
        "hparams": policy.hparams(),
        "cost_unit": policy.cost_unit,
        "budget_fraction": None,
        "val_accuracy": None,
        "test_accuracy": None,
        "test_cost_fraction": None,
    }


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def _fraction(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def _number(v: float) -> str:
    """A cost as the run's cost profile holds it: counts whole, milliseconds to 4 significant digits."""
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.4g}"


def _code(code: Mapping[str, Any] | None) -> str:
    if not code:
        return "an unrecorded eenn version"
    text = f"eenn {code.get('version')}"
    if code.get("commit"):
        text += f", commit {str(code['commit'])[:10]}" + (" with uncommitted changes" if code.get("dirty") else "")
    return text


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *map(_row, rows)]


def model_card(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """The README.md of a model dir: Hub metadata, then per-exit accuracy and costs, accuracy at
    25/50/75 % of the full cost, the saved policies, the data, the training config and the eenn
    version."""
    s1 = metrics["stage1"]
    backbone = config["backbone"]
    name = backbone.get("model") or backbone.get("name")
    data = s1.get("data") or config.get("train_config", {}).get("data", {}).get("name", "unknown")
    lines = [
        "---",
        "library_name: eenn",
        "pipeline_tag: image-classification",
        "tags:",
        "- early-exit",
        "- multi-exit",
        "- image-classification",
        "---",
        "",
        f"# {name} with {len(config['exit_names'])} exits on {data}",
        "",
        f"A multi-exit network trained with eenn ({s1.get('training')} training, "
        f"{s1.get('epochs')} epochs): exit heads after {', '.join(config['exit_names'][:-1])} and the backbone's "
        "own classifier. A sample can stop at any exit; a fitted exit policy decides where, under an average "
        "compute budget.",
        "",
        "```python",
        "import eenn",
        'model = eenn.EarlyExitModel.from_pretrained("<this dir or repo id>")',
        "out = model.predict(model.normalise(images))   # out.classes, out.exits, out.cost",
        "logits = model.anytime(model.normalise(images))   # every exit's logits (N, K, C)",
        "```",
        "",
        "## Per-exit accuracy and cost",
        "",
        f"Cost of exit k: the backbone up to it plus every exit head up to it, per sample. Accuracy on the "
        f"run's held-out validation ({metrics['samples']['val']}) and test ({metrics['samples']['test']}) "
        "samples.",
        "",
    ]
    units = [u for u in ("flops", "macs", "params", "latency_ms") if u in metrics["per_exit"][0]]
    lines += _table(
        ["exit", "cost (x full)", *units, "val accuracy %", "test accuracy %"],
        [
            [
                e["exit"],
                f"{e['cost_fraction']:.4f}",
                *[_number(e[u]) for u in units],
                _pct(e["val_accuracy"]),
                _pct(e["test_accuracy"]),
            ]
            for e in metrics["per_exit"]
        ],
    )
    lines += [
        "",
        "## Accuracy at 25/50/75 % of the full cost",
        "",
        f"`{CARD_POLICY}` (MSDNet's rule: exit at the first exit whose max softmax probability passes its "
        "threshold) fitted to each budget on the validation split, evaluated on test.",
        "",
    ]
    lines += _table(
        ["budget (x full cost)", "policy", "val accuracy %", "test accuracy %", "test cost (x full)"],
        [
            [
                f"{b['fraction']:.2f}",
                b["policy"],
                _pct(b["val_accuracy"]),
                _pct(b["test_accuracy"]),
                b.get("note") or f"{b['test_cost_fraction']:.4f}",
            ]
            for b in metrics["budgets"]
        ],
    )
    if metrics["policies"]:
        lines += [
            "",
            "## Saved exit policies",
            "",
            "Fitted on validation; `EarlyExitModel.from_pretrained(..., policy=<name>)` or "
            "`model.with_policy(<name>)` uses one.",
            "",
        ]
        lines += _table(
            [
                "name",
                "policy",
                "cost unit",
                "budget (x full)",
                "val accuracy %",
                "test accuracy %",
                "test cost (x full)",
            ],
            [
                [
                    p["name"],
                    p["policy"],
                    p["cost_unit"],
                    "—" if p["budget_fraction"] is None else f"{p['budget_fraction']:.4f}",
                    _pct(p["val_accuracy"]),
                    _pct(p["test_accuracy"]),
                    _fraction(p["test_cost_fraction"]),
                ]
                for p in metrics["policies"]
            ],
        )
    norm = config.get("normalisation") or {}
    lines += [
        "",
        "## Data",
        "",
        f"- dataset: `{data}`; input (C, H, W) = {tuple(config['input_shape'])}; {len(config['class_names'])} "
        f"classes: {', '.join(map(str, config['class_names']))}",
        f"- normalisation (of pixels in [0, 1]): mean {norm.get('mean')}, std {norm.get('std')}",
        "",
        "## Training config",
        "",
        "```json",
        json.dumps(config.get("train_config", {}), indent=2, sort_keys=True),
        "```",
        "",
        "## Version",
        "",
        f"Saved by eenn {config.get('eenn_version')}; trained by {_code(s1.get('code'))}.",
        "",
    ]
    return "\n".join(lines)
