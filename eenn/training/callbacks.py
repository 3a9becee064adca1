"""Callbacks: a resumed run continues exactly where the interrupted one stopped; the progress bar
reads values from the device every few steps, not after every one, and redraws a few times a second."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


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
            "numpy": {
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached": float(cached),
            },
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


def loggers_write_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this training step's values to the loggers (its own test, read
    the same way from the step until the end of its batch)."""
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)


class _ReadsEveryN:
    """A Lightning progress bar that reads the values it shows from the device only on the steps
    whose values Lightning writes to the loggers (every ``trainer.log_every_n_steps``), and at the
    ends of epochs: on a GPU each read waits for the device to finish all queued work, which
    Lightning's bars do after every batch.

    It shows what the stock bar shows, with the module's per-step values named in its
    ``bar_metrics`` (logged with ``prog_bar=False``, so that Lightning itself converts none of
    them per step) read from ``trainer.callback_metrics``.

    Within an epoch it redraws on those steps, on the epoch's last batch and otherwise at most
    every ``min_interval`` seconds (tqdm's own default rate): the stock bars update their state
    after every batch, about 0.1 ms per step (1 % of a small model's step) for a display that
    repaints a few times a second.
    """

    _read, _shown, _drawn = True, None, -math.inf
    min_interval = 0.1

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        if not self._read:  # between reads: the values read last (none before the first read)
            return {**metrics, **(self._shown or {})}
        logged = trainer.callback_metrics
        self._shown = {name: logged[name].item() for name in getattr(pl_module, "bar_metrics", ()) if name in logged}
        return {**metrics, **self._shown}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._read = loggers_write_this_step(trainer)
        now = time.monotonic()
        try:
            if self._read or now - self._drawn >= self.min_interval or batch_idx + 1 >= trainer.num_training_batches:
                self._drawn = now
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # type: ignore[misc]
        finally:
            self._read = True


class TQDMProgressBarReads(_ReadsEveryN, TQDMProgressBar):
    pass


class RichProgressBarReads(_ReadsEveryN, RichProgressBar):
    pass


def install_progress_bar_reads(trainer: pl.Trainer) -> None:
    """Replace the trainer's progress bar, when it is Lightning's stock TQDM or Rich bar with its
    settings, by the same bar reading values only where the loggers read them too."""
    bar = trainer.progress_bar_callback
    if type(bar) is TQDMProgressBar:
        new: _ReadsEveryN = TQDMProgressBarReads(bar.refresh_rate, bar._process_position, bar._leave)
    elif type(bar) is RichProgressBar:
        new = RichProgressBarReads(bar.refresh_rate, bar._leave, bar.theme, bar._console_kwargs)
    else:
        return
    trainer.callbacks[trainer.callbacks.index(bar)] = new
