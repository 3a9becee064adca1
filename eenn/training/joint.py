"""Stage 1, joint loss: L = sum_k w_k CE_k + alpha_KL sum_{k<K} tau^2 KL(softmax(z_K/tau) || softmax(z_k/tau))
(EENet sec. 3.1; BranchyNet's and Distiller's weighted sum when alpha_KL = 0).

The distillation term's settings (``training.kl_*``): ``kl_alpha`` its weight (0: off);
``kl_tau`` the temperature tau both distributions are softened by (the tau^2 factor keeps its
gradients' scale as tau changes, as in Hinton et al.); ``kl_reduction``: ``batchmean`` sums the KL
over the C classes and averages it over the batch (the KL as the paper writes it), ``mean``
averages over the classes too, i.e. divides by C (``torch.nn.KLDivLoss()``'s default, which the
EENet authors' train.py uses: per unit alpha, ``batchmean`` is C times stronger); ``kl_start`` the
fraction of ``trainer.max_epochs`` after which it is on; ``kl_detach_teacher`` whether the final
exit is a constant target (true) or is pulled towards the early exits too (false, the authors'
code). The ``eenet_*`` experiments take the authors' code: alpha 0.01, tau 3, ``mean``, on after
0.75 of the epochs, the teacher not detached (git-disl/EENet train.py). The defaults (tau 1,
``batchmean``, detached) are the formula's plain KL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy
from timm.data import Mixup

from eenn.cost import CostProfile
from eenn.errors import EENNError, check_flag
from eenn.models.multi_exit import MultiExitNetwork
from eenn.training.callbacks import install_progress_bar_reads, loggers_write_this_step
from eenn.training.losses import KL_REDUCTIONS, exit_loss_weights, self_distillation_kl
from eenn.utils.compile import Compiled

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def metric_key(exit_name: str) -> str:
    """Exit names like ``layer1.8`` as metric keys (torchmetrics/ModuleDict forbid dots)."""
    return exit_name.replace(".", "_")


class EpochMeans:
    """Per-epoch means of per-batch values, weighted by batch size, accumulated on the device.

    A step adds one vector of values (one in-place scaled add) and the batch size (a host int), so logging
    costs no host-device synchronisation and one ``self.log`` call per epoch instead of one per
    value and step. The means are Lightning's own for ``self.log(..., on_epoch=True,
    batch_size=b, sync_dist=True)``: sum over batches (and ranks) of value x b, over the sum of b.
    Each ``key`` holds a fixed list of names (values logged on different batches get their own key).
    """

    def __init__(self) -> None:
        self.sums: dict[str, tuple[tuple[str, ...], torch.Tensor]] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, names: tuple[str, ...], values: torch.Tensor, batch_size: int) -> None:
        values = values.detach().float()
        if key in self.sums:
            self.sums[key][1].add_(values, alpha=batch_size)
            self.counts[key] += batch_size
        else:
            self.sums[key], self.counts[key] = (names, values * batch_size), batch_size

    def pop(self, prefix: str, strategy: Any) -> dict[str, torch.Tensor]:
        """The means of every key starting with ``prefix`` (reduced over ranks), forgotten here."""
        means: dict[str, torch.Tensor] = {}
        for key in [k for k in self.sums if k.startswith(prefix)]:
            names, sums = self.sums.pop(key)
            count = torch.tensor(float(self.counts.pop(key)), device=sums.device)
            sums, count = strategy.reduce(sums, reduce_op="sum"), strategy.reduce(count, reduce_op="sum")
            means.update(zip(names, (sums / count).unbind()))
        return means


class MultiExitModule(pl.LightningModule):
    """What every stage-1 module shares: the network, per-exit metrics, evaluation steps, optimiser.

    ``cost_profile`` is the network's per-exit cost (for modules whose loss uses it, such as the
    bi-level one); the run passes it to every stage-1 module. ``channels_last`` keeps the weights
    and the images in NHWC memory, which oneDNN and cuDNN convolutions run faster (about 1.25x
    per training step for a CIFAR ResNet on CPU); the values are the same either way.
    ``compile`` runs the training steps' forward passes through ``torch.compile`` (evaluation
    stays eager: its batch sizes vary); a network that does not compile trains eagerly, with one
    warning line. Refused with DDP on the CPU.

    A training step synchronises the host with the device nowhere: per-exit accuracies and the
    other per-epoch values accumulate on the device (:class:`EpochMeans`) and are logged at the
    epoch's end; the loss is logged as ``train/loss_step`` on the steps whose values Lightning
    writes to the loggers (every ``trainer.log_every_n_steps``), where the progress bar reads it
    too, and as ``train/loss_epoch``, its epoch mean (what ``self.log(on_step=True,
    on_epoch=True)`` logged, at the cost of one ``self.log`` per step).
    """

    #: per-step values the progress bar shows, read from the device every log_every_n_steps steps
    bar_metrics: tuple[str, ...] = ("train/loss_step", "train/loss_epoch")

    def __init__(
        self,
        network: MultiExitNetwork,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        cost_profile: CostProfile | None = None,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        # the compiled forward is a function, not a submodule: the state dict keeps its keys
        self.compiled = (
            Compiled(
                network.forward, "training.compile=true", f"the network ({type(network.stages[0]).__name__} stages)"
            )
            if check_flag(compile, "training.compile")
            else None
        )
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.network = network.to(memory_format=self.memory_format)
        self.cost_profile = cost_profile
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.exit_keys = tuple(metric_key(n) for n in network.exit_names)
        self.epoch_means = EpochMeans()
        self.mixup: Mixup | None = None  # set_mixup

    def set_mixup(self, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float, num_classes: int) -> None:
        """timm's Mixup/CutMix (the ViT recipe) when either alpha is set: soft targets, with the
        label smoothing folded into them."""
        self.mixup = (
            Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            if mixup_alpha > 0 or cutmix_alpha > 0
            else None
        )

    def mix_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, targets, labels) of a training batch: with Mixup/CutMix the mixed images, soft
        targets (B, C) and their argmax as the labels; without, the batch as it came."""
        if self.mixup is None:
            return x, y, y
        if len(x) % 2:
            raise EENNError(f"training.mixup_alpha/cutmix_alpha need an even data.batch_size, got a batch of {len(x)}.")
        x, targets = self.mixup(x, y)
        return x, targets, targets.argmax(-1)

    def as_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images in the network's memory format (a no-op when they already are)."""
        return x.contiguous(memory_format=self.memory_format) if x.ndim == 4 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.as_input(x))

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network on a training batch: compiled with ``training.compile=true``."""
        x = self.as_input(x)
        return self.network(x) if self.compiled is None else self.compiled(x)

    def accumulate(
        self,
        split: str,
        logits: torch.Tensor,
        y: torch.Tensor,
        names: tuple[str, ...] = (),
        values: torch.Tensor | None = None,
    ) -> None:
        """Add a batch to ``split``'s epoch means: each exit's accuracy (``<split>/acc/<exit>``)
        and, when given, ``values`` (n,) under ``names``."""
        correct = (logits.detach().argmax(-1) == y[:, None]).float().mean(0)
        acc_names = tuple(f"{split}/acc/{k}" for k in self.exit_keys)
        if values is None:
            self.epoch_means.add(split, acc_names, correct, len(y))
        else:
            self.epoch_means.add(split, (*names, *acc_names), torch.cat([values.detach().float(), correct]), len(y))

    def log_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        """``train/loss_step`` where the loggers write this step, ``train/loss_epoch`` at the epoch's end."""
        self.epoch_means.add("train/loss", ("train/loss_epoch",), loss.view(1), batch_size)
        if loggers_write_this_step(self.trainer):
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=batch_size, sync_dist=True)

    def log_epoch_means(self, prefix: str) -> None:
        """Log the means accumulated under keys starting with ``prefix`` (the host's one read of them)."""
        means = self.epoch_means.pop(prefix, self.trainer.strategy)
        if means:
            self.log_dict(means, on_step=False, on_epoch=True)

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> None:
        x, y = batch
        logits = self(x)
        ce = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(logits.shape[1]))
        self.accumulate(split, logits, y, (f"{split}/ce",), ce.view(1))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_train_epoch_end(self) -> None:
        self.log_epoch_means("train")

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_means("val")

    def on_test_epoch_end(self) -> None:
        self.log_epoch_means("test")

    def configure_callbacks(self) -> list[Any]:
        """Refuse what cannot run before Lightning starts; and since Lightning's default progress
        bar reads every value it shows from the device after every batch, swap in the same bar
        reading them every log_every_n_steps batches."""
        t = self.trainer
        if (
            self.compiled is not None
            and isinstance(t.strategy, DDPStrategy)
            and isinstance(t.accelerator, CPUAccelerator)
        ):
            raise EENNError(
                "training.compile=true is not supported with DDP on the CPU (trainer=ddp without GPUs); "
                "set training.compile=false or train on GPUs."
            )
        install_progress_bar_reads(t)
        return []

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(params=self.network.parameters())
        if self.scheduler_factory is None:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=opt), "interval": self.scheduler_interval},
        }


class JointTraining(MultiExitModule):
    def __init__(
        self,
        network: MultiExitNetwork,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        loss_weights: str | Sequence[float] = "uniform",
        kl_alpha: float = 0.0,
        kl_tau: float = 1.0,
        kl_start: float = 0.75,
        kl_detach_teacher: bool = True,
        kl_reduction: str = "batchmean",
        warmup_epochs: int = 0,
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
        self.set_mixup(mixup_alpha, cutmix_alpha, label_smoothing, num_classes)
        self.register_buffer("loss_weights", exit_loss_weights(loss_weights, network.num_exits), persistent=False)
        # the warm-up's weights, made once: a tensor built per step would be a host-to-device copy
        only_final = F.one_hot(torch.tensor(network.num_exits - 1), network.num_exits).to(self.loss_weights)
        self.register_buffer("warmup_weights", only_final, persistent=False)
        self.kl_alpha, self.kl_tau, self.kl_start, self.kl_detach_teacher = (
            kl_alpha,
            kl_tau,
            kl_start,
            kl_detach_teacher,
        )
        if kl_reduction not in KL_REDUCTIONS:
            raise EENNError(f"training.kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}.")
        self.kl_reduction = kl_reduction
        self.warmup_epochs, self.label_smoothing = warmup_epochs, label_smoothing

    def current_weights(self) -> torch.Tensor:
        """During the warm-up epochs only the final exit trains (EENet trains 20 epochs without exits)."""
        return self.warmup_weights if self.current_epoch < self.warmup_epochs else self.loss_weights

    def kl_active(self) -> bool:
        max_epochs = self.trainer.max_epochs if self._trainer is not None and self.trainer.max_epochs else 1
        return self.kl_alpha > 0 and self.current_epoch >= self.kl_start * max_epochs

    def joint_loss(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, per-exit CE (K,), KL term) for logits (B, K, C) and class indices (B,) or, with
        Mixup/CutMix, soft targets (B, C)."""
        b, k, c = logits.shape
        smoothing = self.label_smoothing if y.ndim == 1 else 0.0  # timm's Mixup smoothed them already
        ce = (
            F.cross_entropy(
                logits.reshape(b * k, c), y.repeat_interleave(k, dim=0), reduction="none", label_smoothing=smoothing
            )
            .view(b, k)
            .mean(0)
        )
        total = (self.current_weights() * ce).sum()
        kl = logits.new_zeros(())
        if self.kl_active():
            kl = self_distillation_kl(logits, self.kl_tau, self.kl_detach_teacher, self.kl_reduction)
            total = total + self.kl_alpha * kl
        return total, ce, kl

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, targets, y = self.mix_batch(*batch)
        logits = self.train_forward(x)
        loss, ce, kl = self.joint_loss(logits, targets)
        self.log_loss(loss, len(y))
        names = tuple(f"train/ce/{k}" for k in self.exit_keys)
        if self.kl_alpha > 0:
            self.accumulate("train", logits, y, (*names, "train/kl"), torch.cat([ce.detach(), kl.detach().view(1)]))
        else:
            self.accumulate("train", logits, y, names, ce)
        return loss
