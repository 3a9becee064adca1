"""Online switching between policies fitted for different budgets (EENet, "Adapting to dynamic
budget settings", Table 5).

A policy meets its budget on the validation data it was fitted on, not on a test stream that
turns out easier or harder. The switcher holds several fitted policies; over a stream of test
batches, after each batch it computes the budget left per remaining sample,
(target * N - spent) / (N - seen), and moves to the policy whose budget is closest to it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from eenn.errors import EENNError
from eenn.policies.base import ExitPolicy, build_policy
from eenn.policies.simulate import realised_cost, simulate
from eenn.predictions import Predictions


class BudgetSwitcher:
    def __init__(self, policies: Sequence[ExitPolicy]) -> None:
        if not policies or any(p.budget is None for p in policies):
            raise EENNError("the budget switcher needs at least one policy, each fitted to a budget.")
        self.policies = sorted(policies, key=lambda p: p.budget)
        self.budgets = torch.tensor([p.budget for p in self.policies], dtype=torch.float64)

    @classmethod
    def fit(cls, val: Predictions, budgets: Sequence[float], cost_unit: str, name: str, **cfg: Any) -> BudgetSwitcher:
        """Fit policy ``name`` (hyper-parameters ``cfg``) once per budget on ``val``."""
        return cls([build_policy(name, **cfg).fit(val, b, cost_unit) for b in budgets])

    def closest(self, budget: float) -> int:
        return int((self.budgets - budget).abs().argmin())

    def run(self, preds: Predictions, target: float, cost_unit: str, batch_size: int) -> dict[str, Any]:
        """Stream ``preds`` in order in batches of ``batch_size``, switching after each batch, for an
        average ``target`` cost per sample. Returns the realised cost and accuracy, and which
        policy (by index into ``budgets``) served each batch."""
        if batch_size < 1:
            raise EENNError(f"batch_size must be a positive integer, got {batch_size}.")
        n = preds.num_samples
        costs, heads = preds.costs_in(cost_unit), preds.head_costs_in(cost_unit)
        spent, correct, choice = 0.0, 0, []
        current = self.closest(target)
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            logits, labels = preds.logits[start:stop], preds.labels[start:stop]
            exit_idx, evaluated = simulate(self.policies[current], logits, labels)
            spent += float(realised_cost(exit_idx, evaluated, costs, heads).sum())
            pred = logits[torch.arange(stop - start), exit_idx].argmax(-1)
            correct += int((pred == labels).sum())
            choice.append(current)
            if stop < n:
                current = self.closest((target * n - spent) / (n - stop))
        return {
            "target": target,
            "avg_cost": spent / n,
            "accuracy": correct / n,
            "budgets": self.budgets.tolist(),
            "policy_per_batch": choice,
            "switches": sum(a != b for a, b in itertools.pairwise(choice)),
        }
