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


class KillAt(CrashAt):
    """SIGKILL of the training process itself: no exception handler, no teardown, no last save."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
