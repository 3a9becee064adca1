"""Stage 1, soft-threshold training: the bi-level paper's eq. 4 with its learned A replaced by the
rule that will actually be deployed.

Deployment fits max-probability thresholds on validation (MSDNet's rule, :mod:`eenn.policies.budget`):
for a budget, exit fractions pi_k ∝ q^k meet the average cost, and at exit k the floor(N pi_k)
most confident samples that are still there leave. The bi-level gater instead learns its own
allocation from confidence features, so training and deployment can disagree about who leaves
where. Here every batch sees the deployed rule:

1. draw a budget b uniformly from the evaluated range (``budget_range``; by default from the first
   exit's cost to the full cost, the range the budget sweeps cover), so one model serves them all;
2. pi(b): the geometric exit fractions whose expected cost is b (``Cost^k`` = exit k's cost over
   the last exit's, as in bi-level training);
3. thresholds eta_k: walking the exits on the batch's max-probability scores s^k, the floor(B pi_k)
   highest remaining scores leave at k (exactly the deployed rule, on this batch);
4. soft exits P^k_i = sigmoid((s^k_i - eta_k) / (softness * std_i s^k)), Pr(k|x) by eq. 5, and
5. theta's loss, eq. 4 at joint training's scale with A = Pr(k|x) (detached: it weights, it is
   not optimised): ``mean_i sum_k (A^k_i + 1) / (K + 1) * CE^k_i``.

No gater, no lambda, no dual ascent: eq. 4's lambda Cost^k is a constant once A is a weight.
Every step is tensor arithmetic on the batch's device (no host synchronisation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from eenn.cost import CostProfile
from eenn.errors import EENNError
from eenn.models.multi_exit import MultiExitNetwork
from eenn.training.bilevel import normalised_exit_costs
from eenn.training.gater import exit_log_probs
from eenn.training.joint import MultiExitModule, OptimizerFactory, SchedulerFactory

#: log q values tabulated for pi(b); q = e^±12 puts all but ~1e-5 of the mass on one end
_LOG_Q = torch.linspace(-12.0, 12.0, 2401, dtype=torch.float64)


def geometric_fractions_table(costs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected cost (M,), fractions (M, K)) of pi_k ∝ q^k over a grid of log q, increasing in cost."""
    ks = torch.arange(costs.numel(), dtype=torch.float64)
    pi = torch.softmax(_LOG_Q[:, None] * ks[None, :], dim=1)
    return pi @ costs.double(), pi


def fractions_for_budget(budget: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """pi (K,) whose expected cost is ``budget`` (a 0-d tensor, a fraction of the last exit's cost):
    linear interpolation in the tabulated curve (no host synchronisation)."""
    cost, pi = table
    i = torch.searchsorted(cost, budget.reshape(1).to(cost)).clamp(1, cost.numel() - 1)
    lo, hi = cost[i - 1], cost[i]
    w = ((budget.to(cost) - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    return (pi[i - 1] * (1 - w)[:, None] + pi[i] * w[:, None]).squeeze(0)


def soft_exit_distribution(scores: torch.Tensor, fractions: torch.Tensor, softness: float) -> torch.Tensor:
    """A (B, K): Pr(k|x) of eq. 5 with P^k the soft version of the deployed rule's exit at k.

    ``scores`` (B, K): each sample's max probability at each exit. ``fractions`` (K,): pi_k, the
    share of all samples the rule lets out at k (floor(B pi_k) of them, walking the exits).
    """
    b, k = scores.shape
    counts = torch.floor(fractions[:-1] * b).long()  # stays on the device: topk below takes a fixed k
    remaining = torch.ones(b, dtype=torch.bool, device=scores.device)
    gate_logits = []
    for j in range(k - 1):
        s = scores[:, j]
        ordered = s.masked_fill(~remaining, -math.inf).sort(descending=True).values
        # eta_j: the counts[j]-th highest remaining score; +inf where nobody leaves, -inf (all leave)
        # where ties at earlier exits left fewer than counts[j]
        eta = ordered.gather(0, (counts[j] - 1).clamp(0, b - 1).view(1)).squeeze(0)
        eta = torch.where(counts[j] > 0, eta, torch.full_like(eta, math.inf))
        scale = softness * s.std().clamp_min(1e-6)
        gate_logits.append((s - eta) / scale)
        remaining = remaining & (s < eta)
    return exit_log_probs(torch.stack(gate_logits, 1)).exp()


class SoftThresholdTraining(MultiExitModule):
    """Joint-scale training whose per-sample exit weights follow the deployed max-probability rule
    at a budget drawn per batch (see the module docstring)."""

    def __init__(
        self,
        network: MultiExitNetwork,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        softness: float = 0.25,
        budget_range: Sequence[float] | None = None,
        cost_unit: str = "flops",
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        cost_profile: CostProfile | None = None,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__(
            network, num_classes, optimizer, scheduler, scheduler_interval, cost_profile, channels_last, compile
        )
        self.save_hyperparameters(ignore=["network", "optimizer", "scheduler", "cost_profile"])
        if (
            isinstance(softness, bool)
            or not isinstance(softness, (int, float))
            or not softness > 0
            or not math.isfinite(softness)
        ):
            raise EENNError(f"training.softness must be a positive number, got {softness!r}.")
        costs = normalised_exit_costs(cost_profile, cost_unit)
        lo, hi = (float(costs[0]), 1.0) if budget_range is None else (None, None)
        if budget_range is not None:
            if len(budget_range) != 2 or not float(costs[0]) <= float(budget_range[0]) < float(budget_range[1]) <= 1:
                raise EENNError(
                    f"training.budget_range must be [low, high] fractions of the last exit's cost with "
                    f"{float(costs[0]):.3f} (the first exit's) <= low < high <= 1, got {list(budget_range)!r}."
                )
            lo, hi = float(budget_range[0]), float(budget_range[1])
        self.softness, self.label_smoothing, self.budget_low, self.budget_high = (
            float(softness),
            label_smoothing,
            lo,
            hi,
        )
        self.set_mixup(mixup_alpha, cutmix_alpha, label_smoothing, num_classes)
        cost_grid, pi_grid = geometric_fractions_table(costs)
        self.register_buffer("exit_costs", costs, persistent=False)
        self.register_buffer("cost_grid", cost_grid, persistent=False)
        self.register_buffer("pi_grid", pi_grid, persistent=False)

    def exit_ce(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """CE^k_i (B, K) for class indices (B,) or, with Mixup/CutMix, soft targets (B, C)."""
        b, k, c = logits.shape
        smoothing = self.label_smoothing if targets.ndim == 1 else 0.0
        return F.cross_entropy(
            logits.reshape(b * k, c), targets.repeat_interleave(k, dim=0), reduction="none", label_smoothing=smoothing
        ).view(b, k)

    def allocation(self, logits: torch.Tensor) -> torch.Tensor:
        """A (B, K) for this batch at a budget drawn from ``[budget_low, budget_high]``."""
        with torch.no_grad():
            budget = self.budget_low + (self.budget_high - self.budget_low) * torch.rand((), device=logits.device)
            pi = fractions_for_budget(budget, (self.cost_grid, self.pi_grid)).to(logits.dtype)
            scores = torch.softmax(logits.float(), dim=-1).amax(-1)
            return soft_exit_distribution(scores, pi, self.softness)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, targets, y = self.mix_batch(*batch)
        logits = self.train_forward(x)
        ce = self.exit_ce(logits, targets)
        a = self.allocation(logits.detach())
        k = ce.shape[1]
        loss = ((a + 1) / (k + 1) * ce).sum(1).mean()
        self.log_loss(loss, len(y))
        names = (*(f"train/ce/{n}" for n in self.exit_keys), *(f"train/exit_prob/{n}" for n in self.exit_keys))
        self.accumulate("train", logits, y, names, torch.cat([ce.detach().mean(0), a.mean(0)]))
        return loss
