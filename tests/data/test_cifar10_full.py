"""data=cifar10_full (the full CIFAR-10 as JPEG bytes, decoded once and cached) and the
class-balanced data.train_subset."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from eenn.data import EENNDataModule
from eenn.data.sources import cifar10_jpeg
from eenn.errors import EENNError
from tests.conftest import SHARED_DATASETS

CIFAR10_JPEG = SHARED_DATASETS / "cifar10_jpeg.npz"


def _jpeg_npz(path, n_train: int = 40, n_test: int = 10) -> np.ndarray:
    """A cifar10_jpeg.npz of random 32x32 images; returns the decoded training pixels."""
    rng = np.random.default_rng(0)
    arrays, decoded = {}, None
    for split, n in (("train", n_train), ("test", n_test)):
        blobs, pixels = [], []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=75)
            blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
            pixels.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
        arrays[f"{split}_jpeg"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.cumsum([0, *(len(b) for b in blobs)])
        arrays[f"{split}_labels"] = np.arange(n) % 10
        arrays[f"{split}_names"] = np.array([f"c/{i}.jpg" for i in range(n)])
        decoded = np.stack(pixels) if split == "train" else decoded
    np.savez(path, classes=np.array([f"class{c}" for c in range(10)]), **arrays)
    return decoded


def test_the_jpeg_source_decodes_once_and_reads_its_cache(tmp_path):
    pixels = _jpeg_npz(tmp_path / "c.npz")
    src = cifar10_jpeg(str(tmp_path / "c.npz"), root=str(tmp_path / "cache"))
    assert src.x_train.shape == (40, 3, 32, 32) and src.x_test.shape == (10, 3, 32, 32)
    assert torch.equal(src.x_train.permute(0, 2, 3, 1), torch.from_numpy(pixels))
    (cache,) = (tmp_path / "cache").iterdir()
    assert cache.name.startswith("cifar10_jpeg-") and cache.suffix == ".npz"
    stamp = cache.stat().st_mtime_ns
    again = cifar10_jpeg(str(tmp_path / "c.npz"), root=str(tmp_path / "cache"))
    assert torch.equal(again.x_train, src.x_train) and cache.stat().st_mtime_ns == stamp  # read, not rewritten


def test_a_root_that_cannot_be_written_only_costs_the_decoding(tmp_path):
    _jpeg_npz(tmp_path / "c.npz")
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        src = cifar10_jpeg(str(tmp_path / "c.npz"), root=str(tmp_path / "ro" / "cache"))
    finally:
        os.chmod(tmp_path / "ro", 0o700)
    assert src.x_train.shape[0] == 40


def test_an_absent_or_foreign_file_is_one_sentence(tmp_path):
    with pytest.raises(EENNError, match=r"data.path=.*is not a file; data=cifar10_full reads the full CIFAR-10"):
        cifar10_jpeg(str(tmp_path / "none.npz"), root=str(tmp_path))
    np.savez(tmp_path / "other.npz", x_train=np.zeros(3))
    with pytest.raises(EENNError, match=r"lacks the arrays .*train_jpeg.*it is not cifar10_jpeg.npz"):
        cifar10_jpeg(str(tmp_path / "other.npz"), root=str(tmp_path))


def test_train_subset_is_class_balanced_disjoint_from_validation_and_seeded():
    dm = EENNDataModule(name="digits", val_size=300, train_subset=500, seed=3)
    dm.setup()
    counts = torch.bincount(dm.train_set.y, minlength=10)
    assert len(dm.train_set) == 500 and counts.tolist() == [50] * 10
    train_rows = {tuple(x.flatten().tolist()) for x in dm.train_set.x}
    assert len(dm.val_set) == 300 and not train_rows & {tuple(x.flatten().tolist()) for x in dm.val_set.x}
    other = EENNDataModule(name="digits", val_size=300, train_subset=505, seed=3)
    other.setup()
    assert torch.bincount(other.train_set.y, minlength=10).tolist() == [51] * 5 + [50] * 5


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "data.train_subset"),
        (2.5, "data.train_subset"),
        (100000, r"data.train_subset=100000 asks for 10000 training images per class, but the training split"),
    ],
)
def test_a_bad_train_subset_is_one_sentence(value, message):
    with pytest.raises(EENNError, match=message):
        EENNDataModule(name="digits", train_subset=value).setup()


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10_JPEG.is_file(), reason=f"{CIFAR10_JPEG} is absent (offline datasets live in ../shared)")
def test_the_real_file_holds_the_full_cifar10_and_cifar10_small_is_a_subset_of_it(tmp_path):
    dm = EENNDataModule(
        name="cifar10_jpeg", path=str(CIFAR10_JPEG), root=str(tmp_path), val_size=5000, train_subset=10000
    )
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (10000, 5000, 10000)
    small = np.load(SHARED_DATASETS / "cifar10_small.npz")
    src = dm._load()
    rows = small["train_index"][:100]
    assert np.array_equal(src.x_train[rows].permute(0, 2, 3, 1).numpy(), small["x_train"][:100])
