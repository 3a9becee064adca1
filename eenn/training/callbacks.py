"""Callbacks that make a resumed run continue exactly where the interrupted one stopped."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch


class RNGStateCallback(pl.Callback):
    """Save the Python, NumPy and torch (CPU and CUDA) random states in every checkpoint and
    restore them on resume, so augmentation and dropout draw the same numbers as an
    uninterrupted run. Stored as tensors and ints only: the checkpoint stays loadable with
    ``weights_only=True``."""

    def state_dict(self) -> dict[str, Any]:
        version, py_state, gauss = random.getstate()
        _, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": [version, list(py_state), gauss],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, py_state, gauss = state["python"]
        random.setstate((version, tuple(py_state), gauss))
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
