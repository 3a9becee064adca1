"""What a search over exits (hydra/sweeper=optuna_exits) optimises, from validation predictions only.

``val_auc``: the accuracy a model reaches within a budget, averaged over budgets. At each budget of
a fixed grid of fractions of the full cost, MSDNet's max-probability rule is fitted to the budget
on the validation predictions and scored on them; a budget below the first exit's cost gets 0 (no
answer is possible within it), so that a trial is rewarded for an early exit it can afford. The
grid is fixed, not relative to the trial's own exits, so trials with different exits compare on
the same budgets. ``exit_overhead``: what the early exits add to the plain backbone, the last
exit's cost over the backbone's minus 1 (heads that are evaluated by every sample that reaches the
end). The test predictions are never read: a search that chose on them would report a test score
it was tuned on.
"""

from __future__ import annotations

from collections.abc import Sequence

from eenn.evaluation.offline import evaluate
from eenn.policies import build_policy
from eenn.predictions import Predictions

#: the budgets (fractions of the full cost) ``val_auc`` averages over
BUDGETS = tuple(round(0.1 * i, 1) for i in range(1, 11))
#: the rule fitted at each budget: every paper's baseline, and fitted in milliseconds
POLICY = "maxprob"
#: what a search may optimise, with its direction
OBJECTIVES = {"val_auc": "maximize", "exit_overhead": "minimize"}


def accuracy_at_budgets(val: Predictions, unit: str, budgets: Sequence[float] = BUDGETS) -> list[float]:
    """Validation accuracy of maxprob fitted to each budget (a fraction of the full cost) on ``val``;
    0 where the budget is below the first exit's cost."""
    if val.split == "test":
        raise ValueError("the search objective reads validation predictions only, got test ones")
    costs = val.costs_in(unit)
    out = []
    for b in budgets:
        budget = b * float(costs[-1])
        if budget < float(costs[0]) * (1 - 1e-9):
            out.append(0.0)
            continue
        policy = build_policy(POLICY).fit(val, budget, unit)
        out.append(float(evaluate(policy, val, unit)["accuracy"]))
    return out


def budget_auc(accuracies: Sequence[float], budgets: Sequence[float] = BUDGETS) -> float:
    """The area under accuracy against budget (trapezoids), over the grid's width: a mean accuracy."""
    area = sum((b1 - b0) * (a0 + a1) / 2 for b0, b1, a0, a1 in zip(budgets, budgets[1:], accuracies, accuracies[1:]))
    return area / (budgets[-1] - budgets[0])


def exit_overhead(last_exit_cost: float, backbone_cost: float) -> float:
    """The early heads' cost for a sample that reaches the last exit, as a fraction of the backbone's."""
    return last_exit_cost / backbone_cost - 1.0


def search_objective(val: Predictions, backbone_cost: float, unit: str = "flops") -> dict[str, object]:
    """Both objectives and what they come from, for a training run's metrics."""
    acc = accuracy_at_budgets(val, unit)
    return {
        "val_auc": budget_auc(acc),
        "exit_overhead": exit_overhead(float(val.costs_in(unit)[-1]), backbone_cost),
        "budgets": list(BUDGETS),
        "val_accuracy_at_budgets": acc,
        "policy": POLICY,
        "unit": unit,
    }
