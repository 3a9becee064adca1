"""EENet's learned scheduler (Ilhan et al., sec. 3.2 and Algorithm 1), fitted on validation
predictions.

At exit k the scheduler sees x_k = [softmax of exit k (C), max prob (eq. 2), entropy score (eq. 3),
vote (eq. 4), the earlier exits' scores q_0..q_{k-1}] and computes

- the exit score  q_k = clamp(psi_k^T x_k, 0, 1)  (g_k, linear), an estimate of P(exit k is right);
- the exit assignment logit  h_k(x_k)  (a two-layer ReLU MLP with D_h = hidden_ratio * dim x_k
  hidden units); r_n = softmax over exits of the h_k, the posterior over which exit sample n takes.

Training (Algorithm 1, lines 4-6) alternates, one Adam step each per batch:

- L_g = 1/K sum_{n,k} w_{n,k} BCE(q_{n,k}, 1[exit k right]),  w_{n,k} = r_{n,k} / sum_n' r_{n',k}  (eq. 6)
- L_h = KL(p* || r) + alpha_cost |B - mean_n sum_k r_{n,k} c_k| / B,  p*_k ∝ q_k^{1/beta_h}  (eq. 8-10)

until the loss has not improved by ``min_delta`` for ``patience`` epochs (or ``max_epochs``).

**The earlier scores enter x_k as constants** (``detach_scores=true``, the default): when g is
trained, q_0..q_{k-1} reach g_k without their gradient, so exit k's BCE trains g_k alone, as in
the authors' code (git-disl/EENet, utils/predict_helpers.py: ``score[k_].detach()``); the paper
does not say. ``detach_scores=false`` (eenn before issue 27) lets the gradient through: exit k's
BCE then also moves g_0..g_{k-1}, whose own job is exit 0..k-1's correctness. Measured with
``benchmarks/policy_quality.py --eenet-detach`` (3 scheduler seeds, 5 budgets, paired true - false;
``benchmarks/results/eenet_detach.json``): on a ResNet-20 trained on CIFAR-10 (10,000-image test
set) no detectable difference, every 95 % interval contains 0, the largest mean |difference| is
0.03 points, and 0.05-0.30 points would have been found.

Departures from the paper, each for a stated reason:

- g starts as the max probability (psi = 1 on that feature, 0 elsewhere): with a default random
  init every clamped score can be 0 and p* is then 0/0.
- The BCE sees q squeezed into [1e-4, 1 - 1e-4] so a confidently wrong q = 1 gives a large but
  finite gradient; p* uses max(q, 1e-6).
- Thresholds compare g_k's output before the clamp (see :meth:`EENetPolicy.score`): trained
  scores often pass 1 for many samples, and clamped they would all tie at 1.
- ``lr`` defaults to 1e-2, not 3e-5: full-batch steps (one per epoch) would need ~10^5 epochs at 3e-5.
- Training is a plain torch loop (:meth:`EENetScheduler.fit`), full-batch by default, with early
  stopping on the epoch's loss; it runs on ``num_threads`` CPU threads (default 1): the tensors are small, so one thread
  is nearly as fast on an idle machine and many times faster on a busy one, where OpenMP
  threads wait on each other (measured: 0.34 s vs 6-11 s for 30 epochs on 2 busy cores). Set
  ``null`` to keep torch's setting for large validation sets with many classes.
- **The budget must hold.** Algorithm 1 lets round(N p_k) samples out at exit k with
  p_k = mean_n r_{n,k}; nothing guarantees that the realised thresholded cost meets the budget
  (h only approximates it through l_cost, and ties and rounding move samples). So the exit
  distribution is corrected before the thresholds are set: p_k is tilted to
  pi_k ∝ p_k q^k and log q is found by bisection as the value whose realised validation cost
  (the thresholded simulation itself) is the largest not above the budget; q = 1 keeps h's own
  distribution, q < 1 moves mass to earlier exits, q > 1 to later ones, and the two extremes
  (everyone at the first / the last exit) are candidates too. This is the same search MSDNet's
  geometric rule uses (:func:`eenn.policies.budget.fit_to_budget`), with h's distribution as base.

Only g and the thresholds are needed at inference; h is used in fitting only and not saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from eenn.errors import EENNError, check_number, is_number
from eenn.policies.base import State, register
from eenn.policies.features import entropy_score, probabilities, vote
from eenn.policies.threshold import ThresholdPolicy
from eenn.predictions import Predictions

if TYPE_CHECKING:
    from eenn.policies.eenet_scheduler import EENetScheduler


def exit_inputs(logits_k: torch.Tensor, preds: torch.Tensor) -> torch.Tensor:
    """The label-free part of x_k, (B, C + 3): softmax, max prob, entropy score and vote; ``preds``
    (B, k+1) are the argmax predictions of exits 0..k."""
    p = probabilities(logits_k)
    # one exit agrees with itself: the vote is 1, without the comparisons (a deployed exit 0 runs
    # them per request, in its graph)
    v = torch.ones_like(p[:, 0]) if preds.shape[1] == 1 else vote(preds)
    return torch.cat([p, p.amax(-1, keepdim=True), entropy_score(logits_k)[:, None], v[:, None]], 1)


def _positive(value: Any, key: str, integer: bool = False) -> Any:
    if not is_number(value, integer) or value <= 0:
        raise EENNError(f"policy.{key} must be a positive {'integer' if integer else 'number'}, got {value!r}.")
    return value


@register("eenet")
class EENetPolicy(ThresholdPolicy):
    rounding: ClassVar[str] = "round"  # Algorithm 1, line 16: round(N p_k)
    examples: ClassVar[tuple[dict[str, Any], ...]] = ({"max_epochs": 30, "patience": 20},)  # trains briefly

    def __init__(
        self,
        hidden_ratio: float = 0.5,
        beta_h: float = 1.0,
        alpha_cost: float = 10.0,
        lr: float = 1e-2,
        max_epochs: int = 500,
        patience: int = 50,
        min_delta: float = 1e-4,
        batch_size: int | None = None,
        seed: int = 0,
        enable_progress_bar: bool = False,
        num_threads: int | None = 1,
        detach_scores: bool = True,
    ) -> None:
        super().__init__(thresholds=None)
        self.hidden_ratio = _positive(hidden_ratio, "hidden_ratio")
        self.beta_h = _positive(beta_h, "beta_h")
        self.alpha_cost = _positive(alpha_cost, "alpha_cost")
        self.lr = _positive(lr, "lr")
        self.max_epochs = _positive(max_epochs, "max_epochs", integer=True)
        self.patience = _positive(patience, "patience", integer=True)
        if not is_number(min_delta) or min_delta < 0:
            raise EENNError(f"policy.min_delta must be a non-negative number, got {min_delta!r}.")
        self.min_delta = float(min_delta)
        self.batch_size = None if batch_size is None else _positive(batch_size, "batch_size", integer=True)
        self.seed = check_number(seed, "policy.seed", 0, integer=True)
        self.enable_progress_bar = bool(enable_progress_bar)
        self.num_threads = None if num_threads is None else _positive(num_threads, "num_threads", integer=True)
        if not isinstance(detach_scores, bool):
            raise EENNError(f"policy.detach_scores must be true or false, got {detach_scores!r}.")
        self.detach_scores = detach_scores
        self.scheduler: EENetScheduler | None = None
        self.exit_distribution: torch.Tensor | None = None  # h's p_k on validation, before the budget tilt

    def init_state(self, n: int) -> State:
        K = self._require_fitted()
        return {
            "preds": torch.full((n, K), -1, dtype=torch.int64, device=self.device),
            "scores": torch.zeros(n, K, device=self.device),
        }

    def score(self, k: int, logits_k: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The threshold score is g_k's linear output before the clamp: it orders samples as the
        clamped q_k does but does not tie every sample beyond 1 (many, after training), which
        would leave the budget search only all-or-none choices among them. Later exits see the
        clamped q_k, as in the paper."""
        preds, scores = state["preds"], state["scores"]
        seen = torch.cat([preds[:, :k], logits_k.argmax(-1, keepdim=True)], 1)  # exits 0..k's predictions
        with torch.no_grad():
            raw = self.scheduler.linear_score(k, exit_inputs(logits_k, seen), scores[:, :k])
        # column k written by concatenation, not into a copy: the same values, and in an exported
        # graph a few slices instead of index arithmetic and a scatter per state tensor
        return raw, {
            "preds": torch.cat([seen, preds[:, k + 1 :]], 1),
            "scores": torch.cat([scores[:, :k], raw.clamp(0.0, 1.0)[:, None], scores[:, k + 1 :]], 1),
        }

    def _fit(self, val: Predictions, costs: torch.Tensor, heads: torch.Tensor, budget: float | None) -> None:
        if budget is None:
            raise EENNError("policy 'eenet' needs a budget.")
        super()._fit(val, costs, heads, budget)
        self.info.update(self.scheduler_cost(costs))

    def scheduler_cost(self, costs: torch.Tensor) -> dict[str, Any]:
        """What deciding costs a sample beside the network: at exit k, g_k's product-sum over x_k
        (C + 3 + k multiply-adds, 2 FLOPs each as :mod:`eenn.cost` counts a matmul) plus one
        FLOP per elementwise step of its features (softmax and max: 4C, entropy: 3C, vote:
        (k+1)^2 comparisons). ``scheduler_flops[k]`` is exit k's; ``scheduler_cost_fraction``,
        where the costs are FLOPs or MACs, the largest share of an exit's cost that a sample
        reaching it spends on g_0..g_k (the paper's latencies include it; Table 3 finds it small).
        The budgets exclude it: it is this small, e.g. 1e-5 of a CIFAR ResNet-56 exit."""
        K, C = self._require_fitted(), self.num_classes
        flops = [2 * (C + 3 + k) + 7 * C + (k + 1) ** 2 for k in range(K)]
        info: dict[str, Any] = {"scheduler_flops": flops, "scheduler_cost_fraction": None}
        per_flop = {"flops": 1.0, "macs": 0.5}.get(self.cost_unit)
        if per_flop is not None:
            spent = torch.tensor(flops, dtype=torch.float64).cumsum(0) * per_flop
            info["scheduler_cost_fraction"] = float((spent / costs.double()).max())
        return info

    def base_fractions(self, val: Predictions, costs: torch.Tensor, budget: float) -> torch.Tensor:
        """Train g and h (Algorithm 1, lines 4-6); return h's exit distribution p_k on ``val``."""
        from eenn.policies.eenet_scheduler import Batches, EENetScheduler

        N, K, C = val.logits.shape
        preds = torch.empty(N, K, dtype=torch.int64)
        inputs = torch.empty(N, K, C + 3)  # as large as the logits: built in row blocks, nothing bigger
        for a, block in val.row_blocks():
            rows = slice(a, a + len(block))
            preds[rows] = block.argmax(-1)
            for k in range(K):
                inputs[rows, k] = exit_inputs(block[:, k].contiguous(), preds[rows, : k + 1])
        correct = (preds == val.labels[:, None]).float()
        with torch.random.fork_rng(devices=[]):  # h's init is seeded without touching the global RNG
            torch.manual_seed(self.seed)
            self.scheduler = EENetScheduler(
                K, C, self.hidden_ratio, self.beta_h, self.alpha_cost, self.lr, self.detach_scores
            )
        self.scheduler.costs, self.scheduler.budget = costs.double(), budget
        batches = Batches(inputs, correct, self.batch_size, self.seed)
        threads = torch.get_num_threads()
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        try:
            epochs = self.scheduler.fit(
                batches, self.max_epochs, self.patience, self.min_delta, self.enable_progress_bar
            )
        finally:
            torch.set_num_threads(threads)
        self.scheduler.eval()
        with torch.no_grad():
            _, r_logits = self.scheduler(inputs)
        self.exit_distribution = torch.softmax(r_logits, 1).double().mean(0)
        self.info["epochs"] = epochs
        self.info["exit_distribution"] = self.exit_distribution.tolist()
        return self.exit_distribution

    def hparams(self) -> dict[str, Any]:
        return {
            "hidden_ratio": self.hidden_ratio,
            "beta_h": self.beta_h,
            "alpha_cost": self.alpha_cost,
            "lr": self.lr,
            "max_epochs": self.max_epochs,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "enable_progress_bar": self.enable_progress_bar,
            "num_threads": self.num_threads,
            "detach_scores": self.detach_scores,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        g = {f"g.{name}": p for name, p in self.scheduler.g.state_dict().items()}
        return {**super().tensors(), **g, "exit_distribution": self.exit_distribution}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        from eenn.policies.eenet_scheduler import EENetScheduler

        super().load_tensors(tensors)
        self.scheduler = EENetScheduler(self.num_exits, self.num_classes, self.hidden_ratio)
        self.scheduler.g.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("g.")})
        self.scheduler.to(self.device)
        self.exit_distribution = tensors["exit_distribution"]

    def check_fitted(self) -> None:
        super().check_fitted()
        if tuple(self.exit_distribution.shape) != (self.num_exits,):
            raise ValueError(
                f"'exit_distribution' has shape {tuple(self.exit_distribution.shape)}, expected ({self.num_exits},)"
            )
