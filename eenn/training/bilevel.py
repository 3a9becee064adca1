"""Stage 1, bi-level (Budget-aware EENN, sec. 3, eq. 4-12, supplement B): the backbone with its
exits (theta) and the gater (phi, :mod:`eenn.training.gater`) trained together, so that the network
learns for the budgeted inference it will face: which samples are going to leave early.

Per batch, with CE^k_i exit k's cross-entropy, A^k_i the gater's tempered exit distribution and
Cost^k exit k's cost from the cost profile (``cost_unit``):

- ``flops``, ``macs``, ``params``, ``latency_ms``: divided by the last exit's (the full model with
  its early heads: Cost^K = 1, so lambda is in units of "one full forward pass");
- ``gflops``, ``gmacs``: absolute, in 10^9 FLOPs or MACs (lambda in nats per GFLOP).

The paper never states Cost's unit, and the unit sets what a given lambda means: lambda Cost^k
spreads lambda (Cost^K - Cost^1) nats between the first and the last exit, to weigh against the
CE by which they differ. With lambda = 2: as a fraction, 1.25 nats on a CIFAR ResNet-20 (exits at
0.375 / 0.713 / 1), more than that CE gap, so the gater sends every sample to exit 1, and 1.90 nats
on MSDNet-CIFAR (0.05 to 1); in absolute units on MSDNet-CIFAR, 0.26 nats in GMACs (0.0068 to
0.1365: the paper's "137M FLOPs" are multiply-adds) and 0.52 in GFLOPs, which the CE gap can
outweigh. The paper's single lambda = 2 may mean such a unit: ``training=bilevel_paper
training.cost_unit=gmacs`` runs it so. ``training.budget`` stays a fraction of the last exit's
cost in every unit.

- inner step on theta, every batch (eq. 4, 10, 11):
  ``L = mean_i sum_k (A^k_i + 1)(CE^k_i + lambda Cost^k)``. The gradient reaches theta through CE
  and through A, which reads theta's softmax; phi is toggled out of autograd and not stepped.
- outer step on phi, every ``gater_every`` batches (eq. 10, 12):
  ``L = mean_i sum_k (CE^k_i + lambda Cost^k) A^k_i`` with theta fixed.

Which batch the outer step sees: the paper minimises "the same loss function in both the inner and
outer optimization stages, with only the parameters varying", a sum over the training set D (unlike
L2W, whose meta step uses held-out data), so it is the current training batch. theta* is
approximated by the theta that produced this batch's logits (before its inner update): the outer
step reuses those logits and CEs, detached (an alternating, first-order scheme; no second forward
pass, and the validation split stays reserved for stage 2).

Options from the paper's recipe (supplement B), all off by default: label smoothing, timm's
Mixup/CutMix (soft targets), an EMA of theta (timm's ModelEmaV3); RandAugment and random erasing
are data options (``data.randaugment``, ``data.random_erasing``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from timm.utils import ModelEmaV3

from eenn.checkpoints import load_weights
from eenn.cost import CostProfile
from eenn.errors import EENNError
from eenn.models.multi_exit import MultiExitNetwork
from eenn.training.gater import Gater
from eenn.training.joint import MultiExitModule, OptimizerFactory, SchedulerFactory

INTERVALS = ("epoch", "step")


#: the units Cost^k is taken in as it is, not as a fraction of the last exit's: (profile unit, scale)
ABSOLUTE_UNITS = {"gflops": ("flops", 1e-9), "gmacs": ("macs", 1e-9)}


def _profile_costs(costs: CostProfile | None, unit: str, key: str) -> torch.Tensor:
    """Exit k's cumulative cost in the profile's ``unit`` (K,), float64; ``key`` is the setting
    (``training.cost_unit=...``) that asked, for the error."""
    if costs is None:
        raise EENNError("training=bilevel needs the network's cost profile (cost_profile=...; eenn-train passes it).")
    if unit not in costs.units or any(getattr(e, unit) is None for e in costs.exits):
        measured = [u for u in costs.units if all(getattr(e, u) is not None for e in costs.exits)]
        raise EENNError(
            f"training.cost_unit={key!r} is not in the cost profile; measured units: {measured} "
            f"and {sorted(ABSOLUTE_UNITS)} (latency_ms needs cost.latency=true)."
        )
    return torch.tensor(costs.per_exit(unit), dtype=torch.float64)


def normalised_exit_costs(costs: CostProfile | None, unit: str) -> torch.Tensor:
    """Exit k's cumulative cost over the last exit's (K,), in (0, 1]; ``unit`` a profile unit or
    an absolute one (:data:`ABSOLUTE_UNITS`, whose fraction is its profile unit's)."""
    c = _profile_costs(costs, ABSOLUTE_UNITS.get(unit, (unit,))[0], unit)
    return (c / c[-1]).float()


def loss_exit_costs(costs: CostProfile | None, unit: str) -> torch.Tensor:
    """Cost^k (K,) as the losses weigh it: :func:`normalised_exit_costs`, or for an absolute unit
    (``gflops``, ``gmacs``) the cost itself in 10^9 FLOPs or MACs."""
    if unit not in ABSOLUTE_UNITS:
        return normalised_exit_costs(costs, unit)
    base, scale = ABSOLUTE_UNITS[unit]
    return (_profile_costs(costs, base, unit) * scale).float()


def _swap_ema_entries(state_dict: dict[str, Any]) -> None:
    """Exchange ``network.*`` and ``ema.module.*`` in a checkpoint's state dict."""
    for key in [k for k in state_dict if k.startswith("network.")]:
        ema_key = "ema.module." + key.removeprefix("network.")
        state_dict[key], state_dict[ema_key] = state_dict[ema_key], state_dict[key]


class BilevelTraining(MultiExitModule):
    """Manual optimisation with two optimisers: ``optimizer``/``scheduler`` for theta (as in joint
    training) and ``gater_optimizer``/``gater_scheduler`` for phi (Adam 1e-3, cosine to 1e-5 in
    the paper). ``freeze_backbone`` is the paper's "frozen + ours" ablation: theta comes from
    ``init_checkpoint`` and never changes (batch-norm statistics included); only the gater trains,
    on every batch (with theta fixed there is no inner step to alternate with).

    With ``ema_decay`` set, validation during fit uses the EMA weights, and checkpoints store them as
    ``network.*`` (the training weights as ``ema.module.*``, swapped back on resume), so whoever
    loads a checkpoint's network, and the module after fit, evaluates and predicts with the EMA.
    """

    def __init__(
        self,
        network: MultiExitNetwork,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        gater_optimizer: OptimizerFactory | None = None,
        gater_scheduler: SchedulerFactory | None = None,
        gater_scheduler_interval: str = "epoch",
        cost_weight: float = 2.0,
        temperature: float = 0.5,
        gater_every: int = 10,
        features: Sequence[str] = ("confidence", "entropy"),
        gater_hidden: int = 500,
        gater_shared: bool = True,
        cost_unit: str = "flops",
        freeze_backbone: bool = False,
        init_checkpoint: str | None = None,
        clip_grad_norm: float | None = None,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        ema_decay: float | None = None,
        ema_warmup: bool = False,
        cost_profile: CostProfile | None = None,
        channels_last: bool = True,
        grad_through_gater: bool = True,
        budget: float | None = None,
        budget_lr: float = 0.05,
        budget_penalty: float = 10.0,
        joint_warmup_epochs: int = 0,
        normalize_loss: bool = False,
        permute_allocation: bool = False,
        compile: bool = False,
    ) -> None:
        if init_checkpoint:
            load_weights(network, init_checkpoint, "training.init_checkpoint", prefix="network.")
        super().__init__(
            network, num_classes, optimizer, scheduler, scheduler_interval, cost_profile, channels_last, compile
        )
        self.save_hyperparameters(
            ignore=["network", "optimizer", "scheduler", "gater_optimizer", "gater_scheduler", "cost_profile"]
        )
        self.automatic_optimization = False
        for key, value in (
            ("scheduler_interval", scheduler_interval),
            ("gater_scheduler_interval", gater_scheduler_interval),
        ):
            if value not in INTERVALS:
                raise EENNError(f"training.{key} must be one of {INTERVALS}, got {value!r}.")
        if isinstance(gater_every, bool) or not isinstance(gater_every, int) or gater_every < 1:
            raise EENNError(f"training.gater_every must be a positive number of batches, got {gater_every!r}.")
        if not temperature > 0:
            raise EENNError(f"training.temperature must be positive, got {temperature!r}.")
        if freeze_backbone and not init_checkpoint:
            raise EENNError("training.freeze_backbone=true needs training.init_checkpoint=<a stage-1 checkpoint>.")
        if freeze_backbone and ema_decay:
            raise EENNError(
                "training.ema_decay averages a backbone that training.freeze_backbone=true keeps fixed; unset one."
            )
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise EENNError(f"training.clip_grad_norm must be positive or null, got {clip_grad_norm!r}.")
        if isinstance(cost_weight, bool) or not isinstance(cost_weight, (int, float)) or not math.isfinite(cost_weight):
            raise EENNError(f"training.cost_weight (lambda) must be a number, got {cost_weight!r}.")
        if isinstance(joint_warmup_epochs, bool) or not isinstance(joint_warmup_epochs, int) or joint_warmup_epochs < 0:
            raise EENNError(
                f"training.joint_warmup_epochs must be a whole number of epochs >= 0, got {joint_warmup_epochs!r}."
            )
        if not budget_lr > 0:
            raise EENNError(f"training.budget_lr must be positive, got {budget_lr!r}.")
        if not budget_penalty >= 0:
            raise EENNError(f"training.budget_penalty must be >= 0, got {budget_penalty!r}.")

        self.gater = Gater(network.num_exits, features, gater_hidden, gater_shared)
        # Cost^k in the losses' unit, and as fractions of the last exit's (the budget's unit, whatever cost_unit)
        self.register_buffer("exit_costs", loss_exit_costs(cost_profile, cost_unit), persistent=False)
        self.register_buffer("exit_cost_fractions", normalised_exit_costs(cost_profile, cost_unit), persistent=False)
        if budget is not None and not float(self.exit_cost_fractions[0]) < budget <= 1:
            raise EENNError(
                f"training.budget is a fraction of the last exit's cost above the first exit's "
                f"({float(self.exit_cost_fractions[0]):.3f}) and at most 1, got {budget!r} (null: a fixed lambda)."
            )
        # lambda: a constant, or (with a budget) the dual variable of eq. 2's cost constraint; checkpointed
        self.register_buffer("cost_weight", torch.tensor(float(cost_weight)))
        self.gater_optimizer_factory = gater_optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.gater_scheduler_factory = gater_scheduler
        self.gater_scheduler_interval = gater_scheduler_interval
        self.temperature, self.gater_every = temperature, gater_every
        self.grad_through_gater, self.budget, self.budget_lr = grad_through_gater, budget, budget_lr
        self.budget_penalty = budget_penalty
        self.joint_warmup_epochs, self.normalize_loss = joint_warmup_epochs, normalize_loss
        self.permute_allocation = permute_allocation
        self.freeze_backbone, self.clip_grad_norm, self.label_smoothing = (
            freeze_backbone,
            clip_grad_norm,
            label_smoothing,
        )
        self.set_mixup(mixup_alpha, cutmix_alpha, label_smoothing, num_classes)
        self.ema = ModelEmaV3(network, decay=ema_decay, use_warmup=ema_warmup) if ema_decay else None
        if self.ema is not None:
            self.ema.module.requires_grad_(False)
        if freeze_backbone:
            network.requires_grad_(False)
            network.eval()
        self.batches_seen = 0  # checkpointed: decides which batches step the gater

    # ------------------------------------------------------------------------------ losses
    def exit_ce(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """CE^k_i (B, K) for class indices (B,) or, with Mixup/CutMix, soft targets (B, C)."""
        b, k, c = logits.shape
        smoothing = self.label_smoothing if targets.ndim == 1 else 0.0  # timm's Mixup smoothed them already
        return F.cross_entropy(
            logits.reshape(b * k, c), targets.repeat_interleave(k, dim=0), reduction="none", label_smoothing=smoothing
        ).view(b, k)

    def exit_distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """A (B, K), the gater's tempered exit distribution (eq. 5, 9)."""
        return self.gater.exit_distribution(logits, self.temperature)

    def inner_loss(self, logits: torch.Tensor, ce: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 4: (loss, A). Differentiable in theta through CE and, with ``grad_through_gater``
        (eq. 11's second term), through A; without it A only weights each sample's exits.
        During the joint warm-up A is left out: theta trains on the plain sum of the exits' CE.
        ``normalize_loss`` divides each sample's weights (A^k + 1) by their sum (K + 1), so that the
        loss has joint training's scale and only A's reallocation between exits tells them apart
        (with SGD, weight decay and batch norm a loss K + 1 times larger is a larger step size).
        ``permute_allocation`` shuffles A across the batch's samples before it weights them (the
        control for whether the per-sample allocation matters); the returned A is the gater's own."""
        a = self.exit_distribution(logits if self.grad_through_gater else logits.detach())
        # the control arm: each sample gets another sample's A (same batch), which keeps the loss
        # scale, the exits' average weights and lambda's dynamics, and drops only who gets which
        given = a[torch.randperm(len(a), device=a.device)] if self.permute_allocation else a
        weight = given + 1 if self.current_epoch >= self.joint_warmup_epochs else torch.ones_like(a)
        if self.normalize_loss:  # per sample the exits' weights sum to 1, as joint training's uniform 1/K
            weight = weight / weight.sum(1, keepdim=True).detach()
        return (weight * (ce + self.cost_weight * self.exit_costs)).sum(1).mean(), a

    def outer_loss(self, logits: torch.Tensor, ce: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 10 (outer) / 12: (loss, A); theta is held fixed (its outputs are detached). With a
        training budget B the loss is the augmented Lagrangian: eq. 12 with lambda the multiplier,
        plus ``budget_penalty``/2 (E_A[Cost] - B)^2. The loss is linear in A, so at a fixed lambda
        the gater swings whole batches between exits, and lambda's dual steps chase it round a
        cycle; the quadratic term pulls the batch's cost to B at every step and damps that.

        E_A[Cost] is the batch's mean m of the samples' expected costs c_i, so over batches the
        term's expectation is rho/2 ((mu - B)^2 + Var_i(c_i) / n), mu the mean over the data and
        n the batch size: besides the budget gap it penalises the spread of c_i across samples,
        i.e. it pulls towards giving every sample the same expected cost, against the per-sample
        allocation the gater is for. The pull is small: c_i lies in [Cost^1, 1], so
        Var_i(c_i) <= 1/4 and the term is at most rho / (8 n) (0.02 nats at rho = 10, n = 64),
        against CE differences between exits of tenths of a nat and more. A penalty on a running
        mean across batches would avoid it, at the price of a slower pull to B."""
        a = self.exit_distribution(logits.detach())
        loss = ((ce.detach() + self.cost_weight * self.exit_costs) * a).sum(1).mean()
        if self.budget is not None:
            loss = loss + self.budget_penalty / 2 * (self.expected_cost(a) - self.budget) ** 2
        return loss, a

    # ---------------------------------------------------------------------------- training
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, targets, y = self.mix_batch(*batch)
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        bs = len(x)
        if self.freeze_backbone:
            with torch.no_grad():
                logits = self.network(self.as_input(x))
            ce = self.exit_ce(logits, targets)
        else:
            with self.toggled_optimizer(opts[0]):  # phi out of autograd: the gradient through A is theta's only
                logits = self.train_forward(x)
                ce = self.exit_ce(logits, targets)
                loss, a = self.inner_loss(logits, ce)
                self._step(opts[0], loss, self.clip_grad_norm)
            if self.ema is not None:
                self.ema.update(self.network, step=self.batches_seen + 1)
            self.log_loss(loss, bs)
        if self.freeze_backbone or (self.batches_seen + 1) % self.gater_every == 0:
            gater_loss, a_outer = self.outer_loss(logits, ce)
            self._step(opts[-1], gater_loss)
            self._dual_ascent(a_outer.detach())
            self.epoch_means.add("train/gater", ("train/gater_loss",), gater_loss.view(1), bs)
            if self.freeze_backbone:
                a = a_outer
        self.batches_seen += 1
        self._log_exits(logits, y, ce.detach(), a.detach())

    def expected_cost(self, a: torch.Tensor) -> torch.Tensor:
        """The average cost (fraction of the last exit's) if the samples left where A sends them."""
        return (a * self.exit_cost_fractions).sum(1).mean()

    def _dual_ascent(self, a: torch.Tensor) -> None:
        """With a training budget B: lambda <- lambda + budget_lr (E_A[Cost] - B), dual ascent on the
        Lagrangian of eq. 2 with the constraint E_A[Cost] = B. An equality, not "at most B": the
        test-time thresholds spend the whole budget, so A should send samples where they will go
        then; lambda goes negative when the gater, left alone, would spend less. Under DDP every
        rank takes the mean over all ranks' batches, so lambda stays the same everywhere."""
        if self.budget is None:
            return
        gap = self.expected_cost(a) - self.budget
        if self._trainer is not None and self.trainer.world_size > 1:
            gap = self.trainer.strategy.reduce(gap, reduce_op="mean")
        self.cost_weight.add_(self.budget_lr * gap)

    def _step(self, opt: LightningOptimizer, loss: torch.Tensor, clip: float | None = None) -> None:
        opt.zero_grad()
        self.manual_backward(loss)
        if clip is not None:
            self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt.step()
        self._step_schedulers("step", opt)

    def _step_schedulers(self, interval: str, opt: LightningOptimizer | None = None) -> None:
        """Manual optimisation: Lightning leaves the schedulers to us."""
        for cfg in self.trainer.lr_scheduler_configs:
            if cfg.interval == interval and (opt is None or cfg.scheduler.optimizer is opt.optimizer):
                cfg.scheduler.step()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._step_schedulers("epoch")

    def _log_exits(self, logits: torch.Tensor, y: torch.Tensor, ce: torch.Tensor, a: torch.Tensor) -> None:
        """The per-exit diagnostics, as epoch means: CE, A, the expected cost, lambda, and the share
        of samples whose likeliest exit under A is each exit (the gater's hard choice)."""
        keys = self.exit_keys
        names = (
            *(f"train/ce/{k}" for k in keys),
            *(f"train/exit_prob/{k}" for k in keys),
            "train/expected_cost",
            "train/cost_weight",
            *(f"train/top_exit/{k}" for k in keys),
        )
        top = F.one_hot(a.argmax(1), a.shape[1]).float().mean(0)  # bincount would ask the device for the size
        values = torch.cat([ce.mean(0), a.mean(0), self.expected_cost(a).view(1), self.cost_weight.view(1), top])
        self.accumulate("train", logits, y, names, values)

    def configure_optimizers(self) -> Any:
        groups = (
            []
            if self.freeze_backbone
            else [(self.optimizer_factory, self.scheduler_factory, self.scheduler_interval, self.network.parameters())]
        )
        groups.append(
            (
                self.gater_optimizer_factory,
                self.gater_scheduler_factory,
                self.gater_scheduler_interval,
                self.gater.parameters(),
            )
        )
        configs = []
        for make_opt, make_sched, interval, params in groups:
            opt = make_opt(params=params)
            cfg: dict[str, Any] = {"optimizer": opt}
            if make_sched is not None:
                cfg["lr_scheduler"] = {"scheduler": make_sched(optimizer=opt), "interval": interval}
            configs.append(cfg)
        return configs

    def configure_callbacks(self) -> list[Any]:
        """Refuse, before Lightning does, the Trainer options that manual optimisation cannot honour."""
        t = self.trainer
        if t.state.fn == TrainerFn.FITTING:
            if t.gradient_clip_val:
                raise EENNError(
                    f"trainer.gradient_clip_val={t.gradient_clip_val} does not apply to training=bilevel "
                    "(two optimisers, manual optimisation); set training.clip_grad_norm instead."
                )
            if t.accumulate_grad_batches != 1:
                raise EENNError(
                    f"trainer.accumulate_grad_batches={t.accumulate_grad_batches} does not apply to "
                    "training=bilevel (manual optimisation); leave it at 1 and raise data.batch_size."
                )
            # the inner backward leaves phi without gradients: DDP must be told to expect that
            if (
                isinstance(t.strategy, DDPStrategy)
                and not self.freeze_backbone
                and not t.strategy._ddp_kwargs.get("find_unused_parameters")
            ):
                raise EENNError(
                    "training=bilevel under DDP needs trainer.strategy=ddp_find_unused_parameters_true "
                    "(the gater gets no gradient in the backbone's step)."
                )
        return super().configure_callbacks()

    # ----------------------------------------------------------------- evaluation and state
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation network: the EMA during fit (validation), else ``network`` (after fit it
        holds the EMA weights)."""
        if self.ema is not None and self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            return self.ema.module(self.as_input(x))
        return self.network(self.as_input(x))

    def train(self, mode: bool = True) -> BilevelTraining:
        super().train(mode)
        if self.freeze_backbone:  # frozen batch-norm statistics are part of the frozen backbone
            self.network.eval()
        return self

    def on_fit_end(self) -> None:
        if self.ema is not None:
            self.network.load_state_dict(self.ema.module.state_dict())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["bilevel_batches_seen"] = self.batches_seen
        if self.ema is not None:
            _swap_ema_entries(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.batches_seen = int(checkpoint.get("bilevel_batches_seen", 0))
        if self.ema is not None:
            _swap_ema_entries(checkpoint["state_dict"])
