import numpy as np
import pytest
import torch

from eenn.data import EENNDataModule
from eenn.errors import EENNError
from tests.conftest import CIFAR10_SMALL, requires_cifar10_small


def test_digits_splits_are_disjoint_seeded_and_complete():
    dm = EENNDataModule(name="digits", val_size=0.2, seed=3)
    dm.setup()
    assert dm.num_classes == 10 and dm.input_shape == (1, 8, 8)
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 1797
    again = EENNDataModule(name="digits", val_size=0.2, seed=3)
    again.setup()
    torch.testing.assert_close(dm.val_indices, again.val_indices)
    other = EENNDataModule(name="digits", val_size=0.2, seed=4)
    other.setup()
    assert not torch.equal(dm.val_indices, other.val_indices)
    x, y = next(iter(dm.split_loader("val")))
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
    assert abs(float(x.mean())) < 0.3  # normalised by the training pixels' statistics


def _write_npz(path, n=60, classes=("a", "b", "c")):
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8),
        y_train=np.arange(n) % 3,
        x_test=rng.integers(0, 255, (30, 16, 16, 3), dtype=np.uint8),
        y_test=np.arange(30) % 3,
        classes=np.array(classes),
    )


def test_npz_source_and_class_filter(tmp_path):
    path = tmp_path / "d.npz"
    _write_npz(path)
    dm = EENNDataModule(name="npz", path=str(path), val_size=10, classes=["c", "a"], augment="cifar")
    dm.setup()
    assert dm.class_names == ["c", "a"] and dm.input_shape == (3, 16, 16)
    assert len(dm.train_set) + len(dm.val_set) == 40 and len(dm.test_set) == 20
    labels = torch.cat([y for _, y in dm.split_loader("test")])
    assert set(labels.tolist()) == {0, 1}
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 16, 16)


@pytest.mark.data
@requires_cifar10_small
def test_shared_cifar10_small_with_deex_binary_subset():
    dm = EENNDataModule(name="npz", path=str(CIFAR10_SMALL), classes=["cat", "dog"], val_size=2000 // 6)
    dm.setup()
    assert dm.num_classes == 2 and len(dm.test_set) == 400 and len(dm.train_set) + len(dm.val_set) == 2000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "cifar10", "root": "/nonexistent"}, "data.download=false"),
        ({"name": "npz", "path": "/nonexistent.npz"}, "data.path='/nonexistent.npz' is not a file"),
        ({"name": "digits", "classes": []}, "data.classes is an empty list"),
        ({"name": "digits", "classes": [3, 11]}, "data.classes: 11 is not a class"),
        ({"name": "digits", "val_size": 5000}, "data.val_size=5000"),
        ({"name": "mnist"}, "data.name='mnist' is not a known dataset; valid: cifar10, cifar100, cifar10_jpeg, digits"),
        ({"name": "imagefolder", "root": "/nonexistent"}, "must hold train/"),
    ],
)
def test_bad_data_config_gives_one_clear_error(kwargs, message):
    with pytest.raises(EENNError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EENNDataModule(**kwargs).setup()


def test_imagefolder_source(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("ant", "bee"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    dm = EENNDataModule(name="imagefolder", root=str(tmp_path), image_size=16, val_size=2, batch_size=3)
    dm.setup()
    assert dm.class_names == ["ant", "bee"] and dm.input_shape == (3, 16, 16)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 16, 16)
    assert len(dm.val_set) == 2 and len(dm.test_set) == 8
