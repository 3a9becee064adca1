"""Augmentation of whole uint8 batches as tensors, on the device the model runs on.

Per-sample torchvision transforms on the loader's process are the slow part of a CIFAR input
pipeline (a few hundred small tensor ops per batch); here a batch is cropped, flipped, converted
and normalised in one gather and one fused multiply-add, wherever the batch already is. The crop
offsets and flips are drawn per sample from the CPU generator (the global one unless given), so a
resumed run draws the same numbers as an uninterrupted one (RNGStateCallback saves that state).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BatchAugment(nn.Module):
    """uint8 images (B, C, H, W) -> normalised float32 (B, C, H, W), in channels-last memory.

    With ``crop_padding`` p > 0 each sample is cropped back to H x W at a random offset in
    [0, 2p] of its zero-padded copy (torchvision's ``RandomCrop(H, padding=p)``); with ``flip``
    each sample is mirrored with probability 1/2 (``RandomHorizontalFlip``). Both off: only the
    conversion and normalisation (``ToDtype(scale=True)`` + ``Normalize``).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], crop_padding: int = 0, flip: bool = False) -> None:
        super().__init__()
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        # (x / 255 - mean) / std as one multiply-add per pixel
        self.register_buffer("scale", (1 / (255 * std_t)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean_t / std_t).view(1, -1, 1, 1), persistent=False)
        self.crop_padding, self.flip = crop_padding, flip

    @property
    def random(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def draw(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample (row offset, column offset, flip) for ``n`` samples, on the CPU."""
        span = 2 * self.crop_padding + 1
        offsets = torch.randint(0, span, (2, n), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return offsets[0], offsets[1], flips

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"BatchAugment takes uint8 images (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if self.random:
            x = self._crop_flip(x, *(t.to(x.device) for t in self.draw(len(x), generator)))
        else:
            x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last, as the crop's result
        return x.float().mul_(self.scale).add_(self.shift)

    def _crop_flip(
        self, x: torch.Tensor, rows0: torch.Tensor, cols0: torch.Tensor, flips: torch.Tensor
    ) -> torch.Tensor:
        """One gather from the zero-padded batch: sample b's pixel (i, j) comes from padded row
        rows0[b] + i and column cols0[b] + j, or cols0[b] + W - 1 - j when it is flipped."""
        b, _, h, w = x.shape
        p = self.crop_padding
        padded = nn.functional.pad(x, (p, p, p, p)) if p else x
        i, j = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        rows = rows0[:, None] + i  # (B, H)
        cols = cols0[:, None] + torch.where(flips[:, None], w - 1 - j, j)  # (B, W)
        batch = torch.arange(b, device=x.device)[:, None, None]
        # advanced indices around the channel slice put it last: (B, H, W, C), i.e. channels-last
        return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
