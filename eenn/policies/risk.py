"""Risk control by Learn then Test (Angelopoulos, Bates, Candès, Jordan and Lei, "Learn then
Test: Calibrating Predictive Algorithms to Achieve Risk Control", 2021): an exit rule whose loss
against the final exit is at most ``epsilon`` on new data, with probability at least 1 - ``delta``
over the calibration set.

**Loss** of a sample, against the final exit's answer: ``drop`` = 1[the final exit is right and
the early-exit answer is wrong] (needs labels); ``disagreement`` = 1[the early-exit answer differs
from the final exit's] (needs none). The risk R(λ) is its expectation.

**Candidates**: one max-probability threshold λ shared by every early exit (a sample answers at
the first early exit whose max p >= λ, else at the last), on a fixed grid ordered from the most
conservative (λ = 1 - 1e-6: almost nobody leaves early) to the most aggressive (λ = 0: everyone at
exit 0). The grid is fixed before the calibration data is seen, as LTT requires.

**p-values** for H_j: R(λ_j) > ε. The loss is 0/1, so on n calibration samples n R̂_j ~ Bin(n, R_j)
and the binomial tail (LTT, sec. 3.1)

    p_j = P(Bin(n, ε) <= n R̂_j)

is a valid p-value: under H_j, Bin(n, R_j) is stochastically larger than Bin(n, ε).

**Fixed-sequence testing** (LTT, sec. 4.1): test H_0, H_1, ... in the grid's order at level δ each
and stop at the first p_j > δ. It controls the family-wise error rate at δ, so with probability
>= 1 - δ every rejected (certified) λ_j has R(λ_j) <= ε. The policy takes the cheapest certified
candidate (on the calibration set's cost), within the budget when one is given. Nothing
certified: every sample answers at the final exit, which has no loss, with a warning.

``certify=False`` drops the test and takes the cheapest candidate whose empirical calibration risk
is <= ε: maxprob fitted to the risk on validation, the uncertified baseline the comparisons draw.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch

from eenn.errors import EENNError, is_number
from eenn.policies.base import register
from eenn.policies.budget import RTOL, check_realised_budget, within_budget
from eenn.policies.maxprob import MaxProbPolicy
from eenn.predictions import Predictions

LOSSES = ("drop", "disagreement")
#: the finest threshold grid: fitting holds an exit index per validation sample and candidate
MAX_CANDIDATES = 1000


def candidate_grid(m: int) -> torch.Tensor:
    """m shared thresholds (float32), conservative to aggressive: 1 - λ log-spaced from 1e-6 to 1."""
    return (1.0 - torch.logspace(-6.0, 0.0, m, dtype=torch.float64)).to(torch.float32)


def candidate_exits(scores: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(N, M) exit index of each sample under each candidate: the first early exit whose score
    >= λ, else the last. With the running maximum of the early exits' scores (non-decreasing),
    that is the number of early exits whose running maximum is < λ."""
    running = scores[:, :-1].cummax(1).values.contiguous()
    return torch.searchsorted(running, grid.to(running.dtype).expand(scores.shape[0], -1).contiguous(), side="left")


def exit_losses(logits: torch.Tensor, labels: torch.Tensor | None, loss: str) -> torch.Tensor:
    """(N, K) bool: a sample's loss when it answers at exit k, against the final exit."""
    pred = logits.argmax(-1)
    final = pred[:, -1:]
    if loss == "disagreement":
        return pred != final
    if labels is None:
        raise EENNError("risk.loss='drop' needs labels; risk.loss='disagreement' does not.")
    return (final == labels[:, None]) & (pred != labels[:, None])


def binomial_pvalues(losses: torch.Tensor, n: int, epsilon: float) -> torch.Tensor:
    """p_j = P(Bin(n, ε) <= sum of candidate j's losses), for loss sums (..., M)."""
    from scipy.stats import binom  # seconds to import: every eenn app imports the policies, few fit this one

    return torch.from_numpy(binom.cdf(losses.double().numpy(), n, epsilon))


def fixed_sequence(pvalues: torch.Tensor, delta: float) -> torch.Tensor:
    """How many hypotheses fixed-sequence testing rejects, in order, per row of p-values (..., M):
    the length of the leading run of p_j <= δ."""
    return (pvalues <= delta).to(torch.int64).cumprod(-1).sum(-1)


def min_calibration_size(epsilon: float, delta: float) -> int:
    """The fewest samples with which even zero observed loss is certified: (1 - ε)^n <= δ."""
    return math.ceil(math.log(delta) / math.log1p(-epsilon))


@register("risk")
class RiskPolicy(MaxProbPolicy):
    risk_controlled: ClassVar[bool] = True
    # its decisions are fitted to epsilon, not to a budget: a budget is a ceiling it keeps or refuses
    budgeted: ClassVar[bool] = False
    examples: ClassVar[tuple[dict[str, Any], ...]] = (
        {"epsilon": 0.05},
        {"epsilon": 0.1, "loss": "disagreement", "candidates": 20},
        {"epsilon": 0.05, "certify": False},
    )

    def __init__(
        self, epsilon: float = 0.02, delta: float = 0.1, loss: str = "drop", candidates: int = 100, certify: bool = True
    ) -> None:
        super().__init__(None)
        if not is_number(epsilon) or not 0 < epsilon < 1:
            raise EENNError(f"risk.epsilon must be a number in (0, 1), got {epsilon!r}.")
        if not is_number(delta) or not 0 < delta < 1:
            raise EENNError(f"risk.delta must be a number in (0, 1), got {delta!r}.")
        if loss not in LOSSES:
            raise EENNError(f"risk.loss must be one of {LOSSES}, got {loss!r}.")
        if not is_number(candidates, integer=True) or not 2 <= candidates <= MAX_CANDIDATES:
            raise EENNError(f"risk.candidates must be an integer in [2, {MAX_CANDIDATES}], got {candidates!r}.")
        if not isinstance(certify, bool):
            raise EENNError(f"risk.certify must be true or false, got {certify!r}.")
        self.epsilon, self.delta, self.loss = float(epsilon), float(delta), loss
        self.candidates, self.certify = int(candidates), certify

    def hparams(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "loss": self.loss,
            "candidates": self.candidates,
            "certify": self.certify,
        }

    def uncertified(self) -> RiskPolicy:
        """This rule, unfitted, with certify=False: the baseline fitted to the same empirical risk."""
        return type(self)(**{**self.hparams(), "certify": False})

    def _fit(self, val: Predictions, costs: torch.Tensor, heads: torch.Tensor, budget: float | None) -> None:
        n, K = val.num_samples, val.num_exits
        grid = candidate_grid(self.candidates)
        scores = torch.cat([self.score_matrix(block) for _, block in val.row_blocks()])
        exits = candidate_exits(scores, grid)  # (N, M)
        per_exit = torch.cat(
            [exit_losses(block, val.labels[a : a + len(block)], self.loss) for a, block in val.row_blocks()]
        )
        losses = per_exit.gather(1, exits).sum(0)  # (M,)
        mean_cost = costs[exits].mean(0)  # a threshold rule evaluates every head up to its exit
        if self.certify:
            pvalues = binomial_pvalues(losses, n, self.epsilon)
            passed = torch.zeros(self.candidates, dtype=torch.bool)
            passed[: int(fixed_sequence(pvalues, self.delta))] = True
        else:
            passed = losses <= self.epsilon * n
        self.info.update(
            {
                "epsilon": self.epsilon,
                "delta": self.delta,
                "loss": self.loss,
                "certify": self.certify,
                "calibration_size": n,
                "certified_candidates": int(passed.sum()),
            }
        )
        if not bool(passed.any()):
            self._refuse(n, costs, budget)
        else:
            feasible = passed if budget is None else passed & (mean_cost <= budget * (1 + RTOL))
            if not bool(feasible.any()):
                cheapest = float(mean_cost[passed].min())
                raise EENNError(
                    f"no candidate {'certified' if self.certify else 'passing'} at risk.epsilon={self.epsilon:g} is "
                    "within "
                    f"the budget {budget:g} {self.cost_unit}: the cheapest costs {cheapest:g} "
                    f"({cheapest / float(costs[-1]):.4f} of the full cost); raise the budget (budget.fraction=1.0: "
                    "none) "
                    "or risk.epsilon."
                )
            j = int(torch.where(feasible, mean_cost, torch.full_like(mean_cost, math.inf)).argmin())
            self.thresholds = torch.cat([grid[j].repeat(K - 1), torch.tensor([-math.inf])])
            self.info.update(
                {
                    "threshold": float(grid[j]),
                    "candidate": j,
                    "calibration_risk": float(losses[j]) / n,
                    "certified": self.certify,
                    "risk_bound": self.epsilon if self.certify else None,
                }
            )
            if self.certify:
                self.info["p_value"] = float(pvalues[j])
        check_realised_budget(self, val, costs, heads, budget)

    def _refuse(self, n: int, costs: torch.Tensor, budget: float | None) -> None:
        """Nothing certified (or passing): every sample at the final exit, loss 0, with a warning;
        an EENNError where a budget rules the final exit out too."""
        need = min_calibration_size(self.epsilon, self.delta)
        reason = (
            f"policy risk: no candidate is {'certified at' if self.certify else 'within'} "
            f"risk.epsilon={self.epsilon:g} "
            f"(risk.delta={self.delta:g}, risk.loss={self.loss}) on {n} calibration samples"
            + (f" (even with no loss observed it takes at least {need})" if self.certify and n < need else "")
        )
        if budget is not None and not within_budget(float(costs[-1]), budget):
            raise EENNError(f"{reason}, and the final exit exceeds the budget {budget:g}: no exit rule meets both.")
        msg = f"{reason}; every sample answers at the final exit."
        warnings.warn(msg, stacklevel=4)  # at the caller of fit()
        self.thresholds = torch.full((len(costs),), math.inf)
        self.thresholds[-1] = -math.inf
        self.info.update(
            {
                "threshold": None,
                "candidate": None,
                "certified": False,
                "risk_bound": 0.0,
                "calibration_risk": 0.0,
                "warnings": [msg],
            }
        )
