"""Offline evaluation of an exit policy on saved predictions: accuracy, realised cost, exit
fractions and the confusion matrix, from :func:`eenn.policies.simulate.simulate`."""

from __future__ import annotations

from typing import Any

import torch

from eenn.policies.base import ExitPolicy
from eenn.policies.simulate import realised_cost, simulate
from eenn.predictions import Predictions


def evaluate(policy: ExitPolicy, preds: Predictions, unit: str) -> dict[str, Any]:
    """Accuracy, average cost, per-exit fractions and accuracies, the confusion matrix (rows: true
    class, columns: predicted) and the risk against the final exit of ``policy`` on ``preds``,
    costs in ``unit``."""
    exit_idx, heads = simulate(policy, preds.logits, preds.labels)
    return summarize(preds, exit_idx, heads, unit)


def summarize(preds: Predictions, exit_idx: torch.Tensor, heads: torch.Tensor, unit: str) -> dict[str, Any]:
    """The metrics dict S for an assignment of ``preds``' samples to exits."""
    n, K, C = preds.logits.shape
    costs = preds.costs_in(unit)
    cost = realised_cost(exit_idx, heads, costs, preds.head_costs_in(unit))
    pred = torch.cat(
        [block[torch.arange(len(block)), exit_idx[a : a + len(block)]].argmax(-1) for a, block in preds.row_blocks()]
    )
    final = torch.cat([block[:, -1].argmax(-1) for _, block in preds.row_blocks()])
    correct = pred == preds.labels
    per_exit = torch.bincount(exit_idx, minlength=K)
    right = torch.bincount(exit_idx[correct], minlength=K)
    confusion = torch.bincount(preds.labels * C + pred, minlength=C * C).reshape(C, C)
    return {
        "accuracy": float(correct.double().mean()),
        "avg_cost": float(cost.mean()),
        "avg_cost_fraction": float(cost.mean() / costs[-1]),
        "num_samples": n,
        "exit_fractions": (per_exit.double() / n).tolist(),
        "exit_accuracy": [float(r) / int(m) if m else None for r, m in zip(right.tolist(), per_exit.tolist())],
        "confusion": confusion.tolist(),
        # the losses policy=risk bounds, against the final exit: its right answers lost, its answers changed
        "risk": {
            "drop": float(((final == preds.labels) & ~correct).double().mean()),
            "disagreement": float((pred != final).double().mean()),
        },
    }
