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
from timm.data import Mixup
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from eenn.cost import CostProfile
from eenn.errors import EENNError
from eenn.models.multi_exit import MultiExitNetwork
from eenn.training.losses import KL_REDUCTIONS, exit_loss_weights, self_distillation_kl

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def metric_key(exit_name: str) -> str:
    """Exit names like ``layer1.8`` as metric keys (torchmetrics/ModuleDict forbid dots)."""
    return exit_name.replace(".", "_")


def per_exit_accuracy(exit_names: Sequence[str], num_classes: int, prefix: str) -> MetricCollection:
    return MetricCollection(
        {metric_key(n): MulticlassAccuracy(num_classes=num_classes, average="micro") for n in exit_names},
        prefix=prefix,
    )


class MultiExitModule(pl.LightningModule):
    """What every stage-1 module shares: the network, per-exit metrics, evaluation steps, optimiser.

    ``cost_profile`` is the network's per-exit cost (for modules whose loss uses it, such as the
    bi-level one); the run passes it to every stage-1 module. ``channels_last`` keeps the weights
    and the images in NHWC memory, which oneDNN and cuDNN convolutions run faster (about 1.25x
    per training step for a CIFAR ResNet on CPU); the values are the same either way.
    """

    def __init__(
        self,
        network: MultiExitNetwork,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        cost_profile: CostProfile | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.network = network.to(memory_format=self.memory_format)
        self.cost_profile = cost_profile
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        names = network.exit_names
        self.train_acc = per_exit_accuracy(names, num_classes, "train/acc/")
        self.val_acc = per_exit_accuracy(names, num_classes, "val/acc/")
        self.test_acc = per_exit_accuracy(names, num_classes, "test/acc/")
        self.mixup: Mixup | None = None  # set_mixup

    def set_mixup(self, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float, num_classes: int) -> None:
        """timm's Mixup/CutMix (the ViT recipe) when either alpha is set: soft targets, with the
        label smoothing folded into them."""
        self.mixup = (Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=label_smoothing,
                            num_classes=num_classes) if mixup_alpha > 0 or cutmix_alpha > 0 else None)

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

    def _update(self, metrics: MetricCollection, logits: torch.Tensor, y: torch.Tensor) -> None:
        for k, name in enumerate(self.network.exit_names):
            metrics[metric_key(name)].update(logits[:, k], y)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=False)

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> None:
        x, y = batch
        logits = self(x)
        ce = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(logits.shape[1]))
        self.log(f"{split}/ce", ce, on_epoch=True, batch_size=len(y), sync_dist=True)
        self._update(self.val_acc if split == "val" else self.test_acc, logits, y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(params=self.network.parameters())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=opt),
                                                    "interval": self.scheduler_interval}}


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
    ) -> None:
        super().__init__(network, num_classes, optimizer, scheduler, scheduler_interval, cost_profile, channels_last)
        self.save_hyperparameters(ignore=["network", "optimizer", "scheduler", "cost_profile"])
        self.set_mixup(mixup_alpha, cutmix_alpha, label_smoothing, num_classes)
        self.register_buffer("loss_weights", exit_loss_weights(loss_weights, network.num_exits), persistent=False)
        self.kl_alpha, self.kl_tau, self.kl_start, self.kl_detach_teacher = kl_alpha, kl_tau, kl_start, kl_detach_teacher
        if kl_reduction not in KL_REDUCTIONS:
            raise EENNError(f"training.kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}.")
        self.kl_reduction = kl_reduction
        self.warmup_epochs, self.label_smoothing = warmup_epochs, label_smoothing

    def current_weights(self) -> torch.Tensor:
        """During the warm-up epochs only the final exit trains (EENet trains 20 epochs without exits)."""
        if self.current_epoch < self.warmup_epochs:
            return torch.nn.functional.one_hot(
                torch.tensor(self.network.num_exits - 1), self.network.num_exits
            ).to(self.loss_weights)
        return self.loss_weights

    def kl_active(self) -> bool:
        max_epochs = self.trainer.max_epochs if self._trainer is not None and self.trainer.max_epochs else 1
        return self.kl_alpha > 0 and self.current_epoch >= self.kl_start * max_epochs

    def joint_loss(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, per-exit CE (K,), KL term) for logits (B, K, C) and class indices (B,) or, with
        Mixup/CutMix, soft targets (B, C)."""
        b, k, c = logits.shape
        smoothing = self.label_smoothing if y.ndim == 1 else 0.0  # timm's Mixup smoothed them already
        ce = F.cross_entropy(
            logits.reshape(b * k, c), y.repeat_interleave(k, dim=0), reduction="none", label_smoothing=smoothing
        ).view(b, k).mean(0)
        total = (self.current_weights() * ce).sum()
        kl = logits.new_zeros(())
        if self.kl_active():
            kl = self_distillation_kl(logits, self.kl_tau, self.kl_detach_teacher, self.kl_reduction)
            total = total + self.kl_alpha * kl
        return total, ce, kl

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, targets, y = self.mix_batch(*batch)
        logits = self(x)
        loss, ce, kl = self.joint_loss(logits, targets)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log_dict({f"train/ce/{metric_key(n)}": ce[i] for i, n in enumerate(self.network.exit_names)},
                      on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        if self.kl_alpha > 0:
            self.log("train/kl", kl, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        self._update(self.train_acc, logits.detach(), y)
        return loss
