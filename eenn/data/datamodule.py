"""One LightningDataModule for every dataset: train / held-out validation / test.

The validation split is carved from the training set with a seeded permutation and reserved for
stage 2 (EENet and MSDNet hold out 5,000 CIFAR training images): stage-2 policies are fitted on
it, and the test split is only ever used for reporting.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.transforms import v2

from eenn.data.augment import BatchAugment
from eenn.data.sources import IMAGENET_MEAN, IMAGENET_STD, SOURCES, FolderSource, Source
from eenn.errors import EENNError, check_number, is_number

AUGMENTATIONS = ("none", "cifar")


def _class_selection(
    class_names: list[str], classes: Sequence[int | str] | None
) -> tuple[torch.Tensor | None, list[str]]:
    """A label map keeping only ``classes`` (names or ids), renumbered 0..len-1 in the order given."""
    if classes is None:
        return None, list(class_names)
    if len(classes) == 0:
        raise EENNError("data.classes is an empty list; give the class names or ids to keep, or null for all.")
    ids = []
    for c in classes:
        if isinstance(c, str) and c in class_names:
            ids.append(class_names.index(c))
        elif is_number(c, integer=True) and 0 <= c < len(class_names):
            ids.append(c)
        else:
            raise EENNError(f"data.classes: {c!r} is not a class of this dataset; classes: {class_names}.")
    if len(set(ids)) != len(ids):
        raise EENNError(f"data.classes lists a class twice: {list(classes)}.")
    remap = torch.full((len(class_names),), -1, dtype=torch.int64)
    remap[ids] = torch.arange(len(ids))
    return remap, [class_names[i] for i in ids]


def _kept(y: torch.Tensor, remap: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the samples kept by the class selection, and their new labels."""
    if remap is None:
        return torch.arange(len(y)), y
    index = torch.nonzero(remap[y] >= 0).flatten()
    return index, remap[y[index]]


class EpochShuffleSampler(Sampler[int]):
    """A shuffle drawn from (seed, epoch) alone: a run resumed at epoch e sees the same order as an
    uninterrupted one (Lightning calls ``set_epoch``; under DDP it swaps in a DistributedSampler,
    which works the same way)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class BatchTransformCollate:
    """Stack uint8 samples, then run a :class:`BatchAugment` over the whole batch (picklable, for
    loader workers): evaluation loaders hand out normalised float batches, as per-sample transforms did."""

    def __init__(self, transform: BatchAugment) -> None:
        self.transform = transform

    def __call__(self, samples: list[Any]) -> Any:
        x, y = default_collate(samples)
        return self.transform(x), y


class EENNDataModule(pl.LightningDataModule):
    """Train / held-out validation / test splits of one dataset.

    In-memory image arrays (every source but image folders) are augmented as whole batches
    (:mod:`eenn.data.augment`): the training loader hands out uint8 batches, and Lightning's
    ``on_after_batch_transfer`` crops, flips and normalises them on the model's device
    (:meth:`train_batch_transform` does the same for a loop of one's own). Evaluation loaders
    always hand out normalised float batches. RandAugment works on PIL images, so with
    ``randaugment`` set, and for image folders, training images go through per-sample transforms.

    ``meta`` declares the form of the data, ``input_shape`` [C, H, W] and ``num_classes``: the
    dataset's source reads the real form from its files, the ``random`` stand-in makes this one.
    """

    def __init__(
        self,
        name: str = "digits",
        root: str = "data",
        download: bool = False,
        path: str | None = None,
        val_size: float | int = 0.2,
        train_subset: int | None = None,
        classes: Sequence[int | str] | None = None,
        augment: str = "none",
        randaugment: str | None = None,
        random_erasing: float = 0.0,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        source_kwargs: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if augment not in AUGMENTATIONS:
            raise EENNError(f"data.augment must be one of {AUGMENTATIONS}, got {augment!r}.")
        if randaugment is not None and not str(randaugment).startswith("rand"):
            raise EENNError(
                "data.randaugment must be a timm RandAugment string such as 'rand-m9-mstd0.5-inc1', got "
                f"{randaugment!r}."
            )
        if not 0.0 <= random_erasing <= 1.0:
            raise EENNError(f"data.random_erasing is a probability in [0, 1], got {random_erasing!r}.")
        check_number(batch_size, "data.batch_size", 1, integer=True)
        check_number(eval_batch_size, "data.eval_batch_size", 1, integer=True)
        check_number(num_workers, "data.num_workers", 0, integer=True)
        if train_subset is not None:
            check_number(train_subset, "data.train_subset", 1, integer=True)
        self.train_subset = train_subset
        self.randaugment, self.random_erasing = randaugment, random_erasing
        self.name, self.root, self.download, self.path = name, root, download, path
        self.val_size, self.classes, self.augment, self.image_size = val_size, classes, augment, image_size
        self.mean, self.std = mean, std
        self.batch_augment: BatchAugment | None = None  # set by setup() for in-memory arrays
        self._eval_collate: BatchTransformCollate | None = None
        self._erasing: Any = None
        self.batch_size, self.eval_batch_size, self.num_workers, self.seed = (
            batch_size,
            eval_batch_size,
            num_workers,
            seed,
        )
        self.source_kwargs = dict(source_kwargs or {})
        self.meta = dict(meta or {})
        self._src: Source | None = None

    # --- what the model needs to know before training -----------------------------------------
    def prepare_data(self) -> None:
        if self.download:  # fetch once, on one process
            self._build_source(download=True)

    def _build_source(self, download: bool) -> Source:
        # every source is told the declared form: the random stand-in makes it, the others read theirs
        declared = {"image_shape": self.meta.get("input_shape"), "num_classes": self.meta.get("num_classes")}
        kwargs = {**{k: v for k, v in declared.items() if v is not None}, **self.source_kwargs}
        return SOURCES.build(
            self.name, root=str(Path(self.root)), download=download, path=self.path, seed=self.seed, **kwargs
        )

    def _load(self) -> Source:
        if self._src is None:
            self._src = self._build_source(download=False)
            self._remap, self._class_names = _class_selection(self._src.class_names, self.classes)
        return self._src

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_names(self) -> list[str]:
        self._load()
        return list(self._class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._load().input_shape(self.image_size)

    # --- splits --------------------------------------------------------------------------------
    def _val_count(self, n: int) -> int:
        v = self.val_size
        if is_number(v, integer=True):
            count = int(v)
        elif is_number(v) and 0 < v < 1:
            count = int(round(v * n))
        else:  # 1.5 would be read as one sample
            raise EENNError(f"data.val_size must be a fraction in (0, 1) or a whole number of samples, got {v!r}.")
        if not 0 < count < n:
            raise EENNError(f"data.val_size={v} leaves no training or no validation samples out of {n}.")
        return count

    def _subset(self, train_pos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``data.train_subset`` training samples, class-balanced: each class gets N // C of them
        (the first N mod C classes one more), the first ones of the seeded permutation."""
        n = self.train_subset
        if n is None:
            return train_pos
        classes = labels.unique()
        quota = {int(c): n // len(classes) + (k < n % len(classes)) for k, c in enumerate(classes)}
        have = {int(c): int((labels[train_pos] == c).sum()) for c in classes}
        short = {c: have[c] for c in quota if have[c] < quota[c]}
        if short:
            raise EENNError(
                f"data.train_subset={n} asks for {max(quota.values())} training images per class, but the "
                f"training split (after data.val_size) has fewer of classes {sorted(short)} ({short})."
            )
        taken, keep = dict.fromkeys(quota, 0), []
        for pos in train_pos.tolist():
            c = int(labels[pos])
            if taken[c] < quota[c]:
                taken[c] += 1
                keep.append(pos)
        return torch.tensor(keep, dtype=torch.int64)

    def _normalisation(self, src: Source, train_index: torch.Tensor) -> tuple[list[float], list[float]]:
        if self.mean is not None and self.std is not None:
            return list(self.mean), list(self.std)
        if isinstance(src, FolderSource):
            return list(IMAGENET_MEAN), list(IMAGENET_STD)
        x = src.x_train[train_index].double() / 255  # statistics of the training pixels
        return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp_min(1e-3).tolist()

    def _transforms(self, src: Source, mean: list[float], std: list[float]) -> tuple[v2.Transform, v2.Transform]:
        tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        if isinstance(src, FolderSource):
            size = int(self.input_shape[-1])
            train = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
            return v2.Compose([*train, *self._recipe_transforms(size, mean, tail)]), v2.Compose(
                [v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size), *tail]
            )
        h = int(self.input_shape[-1])
        train = [v2.RandomCrop(h, padding=4), v2.RandomHorizontalFlip()] if self.augment == "cifar" else []
        return v2.Compose([*train, *self._recipe_transforms(h, mean, tail)]), v2.Compose(tail)

    def _batched(self, src: Source) -> bool:
        return not isinstance(src, FolderSource) and not self.randaugment

    def _random_erasing(self) -> Any:
        """timm's RandomErasing (per image, or over a batch: it takes both), or None when off."""
        return RandomErasing(self.random_erasing, mode="pixel", device="cpu") if self.random_erasing > 0 else None

    def train_batch_transform(self, x: torch.Tensor) -> torch.Tensor:
        """A training batch as the network takes it: uint8 batches from the training loader are
        augmented and normalised where they are (per-sample-transformed batches pass unchanged)."""
        if self.batch_augment is None or x.dtype != torch.uint8:
            return x
        self.batch_augment.to(x.device)
        x = self.batch_augment(x)
        if self._erasing is not None:
            self._erasing.device = x.device  # its noise patches are drawn where the batch is
            x = self._erasing(x)
        return x

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            x, y = batch
            return self.train_batch_transform(x), y
        return batch

    def _recipe_transforms(self, size: int, mean: list[float], tail: list[v2.Transform]) -> list[v2.Transform]:
        """``tail`` wrapped in the optional timm recipe: RandAugment (on PIL images, before the
        tensor conversion) and random erasing (on the normalised tensor), as timm's create_transform."""
        out: list[v2.Transform] = []
        if self.randaugment:
            fill = tuple(round(255 * m) for m in mean)
            hparams = {"translate_const": int(size * 0.45), "img_mean": fill if len(fill) > 1 else fill[0]}
            if "-mmax" not in self.randaugment:  # at magnitude 10 timm posterizes to 0 bits, which Pillow refuses
                hparams["magnitude_max"] = 9.99
            out += [v2.ToPILImage(), rand_augment_transform(self.randaugment, hparams)]
        out += tail
        if self.random_erasing > 0:
            out.append(self._random_erasing())
        return out

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        src = self._load()
        index, labels = _kept(src.y_train, self._remap)
        n = len(index)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_val = self._val_count(n)
        val_pos, train_pos = perm[:n_val].sort().values, self._subset(perm[n_val:], labels)
        mean, std = self._normalisation(src, index[train_pos])
        self.normalisation = (mean, std)  # per-channel, of pixels in [0, 1]
        if self._batched(src):
            train_tf = eval_tf = torch.nn.Identity()
            self.batch_augment = BatchAugment(
                mean, std, crop_padding=4 if self.augment == "cifar" else 0, flip=self.augment == "cifar"
            )
            self._eval_collate = BatchTransformCollate(BatchAugment(mean, std))
            self._erasing = self._random_erasing()
        else:
            train_tf, eval_tf = self._transforms(src, mean, std)
        self.train_set = src.dataset("train", index[train_pos], labels[train_pos], train_tf)
        self.val_set = src.dataset("train", index[val_pos], labels[val_pos], eval_tf)
        test_index, test_labels = _kept(src.y_test, self._remap)
        self.test_set = src.dataset("test", test_index, test_labels, eval_tf)
        self.val_indices = index[val_pos]  # rows of the source training set: samples can be traced back

    # --- loaders -------------------------------------------------------------------------------
    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=EpochShuffleSampler(len(ds), self.seed) if train else None,
            drop_last=train and len(ds) > self.batch_size,
            collate_fn=None if train or self._eval_collate is None else self._eval_collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)

    def split_loader(self, split: str) -> DataLoader:
        """An ordered, un-augmented loader of the ``val`` or ``test`` split (for predictions)."""
        return self._loader({"val": self.val_set, "test": self.test_set}[split], False)
