"""A callback that kills training mid-epoch, as a crash or a preemption would."""

import lightning.pytorch as pl


class SimulatedCrash(RuntimeError):
    pass


class CrashAt(pl.Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise SimulatedCrash(f"simulated crash at epoch {self.epoch}, batch {self.batch}")
