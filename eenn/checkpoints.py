"""Reading checkpoints: a Lightning checkpoint's state dict, read with ``weights_only=True`` (no
pickled code runs), and its weights loaded into a module only where they fit it (a checkpoint of
another backbone, exits or number of classes is refused by name). As timm's
``_helpers.load_checkpoint`` and mmengine's ``runner/checkpoint.py``, one module for it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from eenn.errors import EENNError


def checkpoint_state(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """The state dict of a Lightning checkpoint, read with ``weights_only=True``; a missing or
    unreadable file is an EENNError naming ``key``."""
    if not Path(path).is_file():
        raise EENNError(f"{key}={str(path)!r} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001  (torch raises several types for a bad archive)
        raise EENNError(f"{key}={str(path)!r} is not a readable checkpoint (truncated or tampered?): {exc}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise EENNError(f"{key}={str(path)!r} is not a Lightning checkpoint (it holds no state_dict).")
    return ckpt["state_dict"]


def _fitting_weights(module: nn.Module, path: str | Path, key: str, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's entries under ``prefix``, if they fit ``module``; a checkpoint of another
    model (backbone, exits, number of classes) is refused by name."""
    weights = {k.removeprefix(prefix): v for k, v in checkpoint_state(path, key).items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    wrong = [
        (k, tuple(weights[k].shape), tuple(v.shape))
        for k, v in own.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if missing or wrong:
        detail = (
            f"{len(wrong)} tensors differ in shape, e.g. {wrong[0][0]}: checkpoint {wrong[0][1]} vs model {wrong[0][2]}"
            if wrong
            else f"{len(missing)} tensors are missing, e.g. {missing[0]}"
        )
        raise EENNError(
            f"{key}={str(path)!r} does not fit this model ({detail}); was it trained with another "
            "backbone, exits or number of classes?"
        )
    return weights


def check_fits(module: nn.Module, path: str | Path, key: str) -> None:
    """Refuse, before Lightning loads it, a checkpoint to resume from that is not this module's."""
    _fitting_weights(module, path, key, prefix="")


def load_weights(module: nn.Module, path: str | Path, key: str, prefix: str = "") -> None:
    """Load a Lightning checkpoint's weights into ``module``: the entries under ``prefix`` (e.g.
    ``network.`` for a stage-1 network, none for the whole training module). ``key`` names the
    checkpoint in errors."""
    module.load_state_dict(_fitting_weights(module, path, key, prefix))
