"""Where images come from: each source returns the raw train/test arrays of one dataset.

Array sources give uint8 images (N, C, H, W) and int64 labels; ``imagefolder`` gives file lists.
Nothing is downloaded unless ``data.download=true``; without it, missing files stop with an error
that names ``data.root`` and ``data.download``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset
from torchvision.datasets import SVHN, ImageFolder
from torchvision.datasets.folder import default_loader

from eenn.errors import EENNError
from eenn.registry import Registry

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ArrayImageDataset(Dataset):
    """uint8 images (N, C, H, W) in memory; ``transform`` maps one uint8 image to a float tensor."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.x[i]), self.y[i]


class FileImageDataset(Dataset):
    """Image files decoded on access (ImageFolder layout), with labels given from outside."""

    def __init__(self, paths: list[str], y: torch.Tensor, transform: Callable) -> None:
        self.paths, self.y, self.transform = paths, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(default_loader(self.paths[i])), self.y[i]


@dataclass
class ArraySource:
    """A dataset held in memory: uint8 images (N, C, H, W), int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str]

    def input_shape(self, image_size: int | None) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def dataset(self, split: str, index: torch.Tensor, labels: torch.Tensor, transform: Callable) -> Dataset:
        x = self.x_train if split == "train" else self.x_test
        return ArrayImageDataset(x[index], labels, transform)


@dataclass
class FolderSource:
    """Image files in the ImageFolder layout: ``<root>/train/<class>/*`` and ``<root>/<test_dir>/<class>/*``."""

    train_files: list[str]
    y_train: torch.Tensor
    test_files: list[str]
    y_test: torch.Tensor
    class_names: list[str]

    def input_shape(self, image_size: int | None) -> tuple[int, ...]:
        if not image_size:
            raise EENNError("data.image_size must be set for image folders (e.g. 224).")
        return (3, image_size, image_size)

    def dataset(self, split: str, index: torch.Tensor, labels: torch.Tensor, transform: Callable) -> Dataset:
        files = self.train_files if split == "train" else self.test_files
        return FileImageDataset([files[i] for i in index.tolist()], labels, transform)


Source = ArraySource | FolderSource
SOURCES: Registry[Source] = Registry("dataset", "data.name")


def _nchw(x: np.ndarray, source: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise EENNError(f"{source}: images must have shape (N, H, W[, C]) or (N, C, H, W), got {x.shape}.")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.dtype != np.uint8:
        raise EENNError(f"{source}: images must be uint8 pixels, got {x.dtype}.")
    return torch.from_numpy(np.ascontiguousarray(x))


@SOURCES.register("digits")
def digits(test_fraction: float = 0.2, seed: int = 0, **_: object) -> ArraySource:
    """scikit-learn's bundled 8x8 digits (no network): the embedded default. It has no official
    test split, so a seeded, stratified ``test_fraction`` is held out."""
    # scikit-learn takes a second to import and only the digits need it
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)  # 0..16 grey levels -> 8-bit pixels
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=test_fraction, random_state=seed, stratify=d.target)
    return ArraySource(
        _nchw(xtr, "digits"),
        torch.as_tensor(ytr, dtype=torch.int64),
        _nchw(xte, "digits"),
        torch.as_tensor(yte, dtype=torch.int64),
        [str(c) for c in range(10)],
    )


def _fetch(name: str, root: str, download: bool, holds: str, load: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
    """(train, test) from a torchvision dataset class; a missing dataset or a failed download is one
    sentence naming data.root / data.download."""
    try:
        return load()
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise EENNError(
            f"{name} is not in data.root={root!r} and data.download=false; set data.download=true "
            f"(needs network) or point data.root at a folder holding {holds} ({exc})."
        ) from None
    except OSError as exc:  # download attempted without network
        raise EENNError(f"data.download=true could not fetch {name} into {root!r}: {exc}.") from None


def _torchvision(cls_name: str, root: str, download: bool, name: str) -> ArraySource:
    cls = getattr(torchvision.datasets, cls_name)
    train, test = _fetch(
        name, root, download, "it", lambda: tuple(cls(root, train=t, download=download) for t in (True, False))
    )
    return ArraySource(
        _nchw(np.asarray(train.data), name),
        torch.as_tensor(train.targets, dtype=torch.int64),
        _nchw(np.asarray(test.data), name),
        torch.as_tensor(test.targets, dtype=torch.int64),
        list(train.classes),
    )


@SOURCES.register("cifar10")
def cifar10(root: str, download: bool = False, **_: object) -> ArraySource:
    return _torchvision("CIFAR10", root, download, "cifar10")


@SOURCES.register("cifar100")
def cifar100(root: str, download: bool = False, **_: object) -> ArraySource:
    return _torchvision("CIFAR100", root, download, "cifar100")


@SOURCES.register("svhn")
def svhn(root: str, download: bool = False, **_: object) -> ArraySource:
    """SVHN's train (73,257) and test (26,032) digits through torchvision (the 531k ``extra`` images
    are not used); the digit 0 is class 0."""
    train, test = _fetch(
        "svhn",
        root,
        download,
        "train_32x32.mat and test_32x32.mat",
        lambda: tuple(SVHN(root, split=s, download=download) for s in ("train", "test")),
    )
    return ArraySource(
        _nchw(train.data, "svhn"),
        torch.as_tensor(train.labels, dtype=torch.int64),
        _nchw(test.data, "svhn"),
        torch.as_tensor(test.labels, dtype=torch.int64),
        [str(c) for c in range(10)],
    )


@SOURCES.register("random")
def random_images(
    image_shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    train_size: int = 64,
    test_size: int = 16,
    seed: int = 0,
    **_: object,
) -> ArraySource:
    """Seeded random uint8 images of ``image_shape`` (C, H, W) with balanced random labels: a
    stand-in of the right shape for smoke runs of configs whose dataset is not at hand."""
    if len(image_shape) != 3 or min(image_shape) < 1 or num_classes < 1 or min(train_size, test_size) < 1:
        raise EENNError(
            f"data.source_kwargs: random images need image_shape [C, H, W], num_classes >= 1 and "
            f"positive sizes, got {list(image_shape)}, {num_classes}, {train_size}, {test_size}."
        )
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, 256, (n, *image_shape), generator=g, dtype=torch.uint8)
        return x, (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]

    (xtr, ytr), (xte, yte) = split(train_size), split(test_size)
    return ArraySource(xtr, ytr, xte, yte, [f"class{c}" for c in range(num_classes)])


@SOURCES.register("npz")
def npz(path: str, **_: object) -> ArraySource:
    """Arrays x_train, y_train, x_test, y_test (and optionally class names in ``classes``)."""
    if not path or not Path(path).is_file():
        raise EENNError(f"data.path={path!r} is not a file; the npz source needs arrays x_train/y_train/x_test/y_test.")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
        if missing:
            raise EENNError(f"data.path={path!r} lacks the arrays {missing}.")
        arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        num_classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
        names = [str(c) for c in f["classes"]] if "classes" in f.files else [str(c) for c in range(num_classes)]
    return ArraySource(
        _nchw(arrays["x_train"], path),
        torch.as_tensor(arrays["y_train"], dtype=torch.int64),
        _nchw(arrays["x_test"], path),
        torch.as_tensor(arrays["y_test"], dtype=torch.int64),
        names,
    )


JPEG_ARRAYS = ("classes", "train_jpeg", "train_offsets", "train_labels", "test_jpeg", "test_offsets", "test_labels")


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Images (N, H, W, 3) uint8 from JPEG files' bytes concatenated in ``blob``, image i at
    ``blob[offsets[i]:offsets[i + 1]]``."""
    import io

    from PIL import Image

    return np.stack(
        [
            np.asarray(Image.open(io.BytesIO(blob[a:b].tobytes())).convert("RGB"))
            for a, b in zip(offsets[:-1], offsets[1:])
        ]
    )


@SOURCES.register("cifar10_jpeg")
def cifar10_jpeg(path: str, root: str = "data", **_: object) -> ArraySource:
    """The full CIFAR-10 stored as its JPEG files' bytes (``../shared/datasets/cifar10_jpeg.npz``,
    see its PROVENANCE.md). Decoding its 60,000 images takes ~15 s, so the pixels are cached once
    in ``data.root`` (``cifar10_jpeg-<md5 of the file>.npz``, written atomically); a root that
    cannot be written to only costs the decoding each time."""
    import hashlib
    import logging
    import os
    import tempfile

    if not path or not Path(path).is_file():
        raise EENNError(
            f"data.path={path!r} is not a file; data=cifar10_full reads the full CIFAR-10 as JPEG bytes "
            "(../shared/datasets/cifar10_jpeg.npz); point data.path at it, or use data=cifar10 "
            "data.download=true where there is network."
        )
    digest = hashlib.md5(Path(path).read_bytes()).hexdigest()[:12]
    cache = Path(root) / f"cifar10_jpeg-{digest}.npz"
    keys = ("x_train", "y_train", "x_test", "y_test")
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as f:
            arrays, names = {k: f[k] for k in keys}, [str(c) for c in f["classes"]]
    else:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in JPEG_ARRAYS if k not in f.files]
            if missing:
                raise EENNError(f"data.path={path!r} lacks the arrays {missing}; it is not cifar10_jpeg.npz.")
            arrays = {
                "x_train": _decode_jpegs(f["train_jpeg"], f["train_offsets"]),
                "y_train": f["train_labels"],
                "x_test": _decode_jpegs(f["test_jpeg"], f["test_offsets"]),
                "y_test": f["test_labels"],
            }
            names = [str(c) for c in f["classes"]]
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npz.tmp")
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, classes=np.array(names), **arrays)
            os.chmod(tmp, 0o644)
            os.replace(tmp, cache)
        except OSError as exc:
            logging.getLogger("eenn.data").warning(
                "data.root=%r: could not cache the decoded CIFAR-10 (%s); it is decoded again next time.", root, exc
            )
    return ArraySource(
        _nchw(arrays["x_train"], path),
        torch.as_tensor(arrays["y_train"], dtype=torch.int64),
        _nchw(arrays["x_test"], path),
        torch.as_tensor(arrays["y_test"], dtype=torch.int64),
        names,
    )


@SOURCES.register("imagefolder")
def imagefolder(root: str, test_dir: str = "val", **_: object) -> FolderSource:
    """ImageNet-style folders; ``data.root`` holds ``train/`` and ``test_dir`` (``val/`` for ImageNet)."""
    dirs = [Path(root) / "train", Path(root) / test_dir]
    for d in dirs:
        if not d.is_dir():
            raise EENNError(f"data.root={root!r} must hold {d.name}/<class>/<images>; {str(d)!r} is missing.")
    train, test = ImageFolder(str(dirs[0])), ImageFolder(str(dirs[1]))
    if train.classes != test.classes:
        raise EENNError(f"data.root={root!r}: train/ and {test_dir}/ have different class folders.")
    return FolderSource(
        [p for p, _ in train.samples],
        torch.as_tensor(train.targets, dtype=torch.int64),
        [p for p, _ in test.samples],
        torch.as_tensor(test.targets, dtype=torch.int64),
        list(train.classes),
    )
