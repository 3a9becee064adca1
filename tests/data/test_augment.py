"""Whole-batch augmentation: the same crops and flips as torchvision's per-sample transforms, every
offset and both flips drawn, reproducible from the generator's seed."""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

from eenn.data import EENNDataModule
from eenn.data.augment import BatchAugment

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def images(n: int = 64, size: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_every_crop_offset_and_both_flips_are_drawn_and_seeded():
    aug = BatchAugment(MEAN, STD, crop_padding=4, flip=True)
    rows, cols, flips = aug.draw(4000, torch.Generator().manual_seed(0))
    assert set(rows.tolist()) == set(range(9)) and set(cols.tolist()) == set(range(9))
    assert set(flips.tolist()) == {False, True}
    x = images()
    same = [aug(x, torch.Generator().manual_seed(7)) for _ in range(2)]
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)
    assert not torch.equal(same[0], aug(x, torch.Generator().manual_seed(8)))


def test_crop_and_flip_equal_torchvision_per_sample():
    aug = BatchAugment(MEAN, STD, crop_padding=4, flip=True)
    x = images()
    g = torch.Generator().manual_seed(3)
    rows, cols, flips = aug.draw(len(x), torch.Generator().manual_seed(3))
    out = aug(x, g)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for b in range(len(x)):
        crop = TF.pad(x[b], [4, 4, 4, 4])[:, rows[b] : rows[b] + 12, cols[b] : cols[b] + 12]
        if flips[b]:
            crop = TF.horizontal_flip(crop)
        torch.testing.assert_close(out[b], (crop.float() / 255 - mean) / std)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_without_crop_and_flip_it_only_normalises():
    x = images(8)
    out = BatchAugment(MEAN, STD)(x)
    torch.testing.assert_close(
        out, (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    )


def test_datamodule_hands_uint8_training_batches_and_float_evaluation_batches():
    dm = EENNDataModule(name="digits", augment="cifar", batch_size=16)
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8
    ready = dm.train_batch_transform(x)
    assert ready.dtype == torch.float32 and ready.shape == x.shape
    xv, _ = next(iter(dm.split_loader("val")))
    assert xv.dtype == torch.float32
    # evaluation batches are the training transform without its randomness
    plain = EENNDataModule(name="digits", augment="none", batch_size=16)
    plain.setup()
    torch.testing.assert_close(plain.train_batch_transform(x), BatchAugment(*plain.normalisation)(x))
