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
    """SIGKILL of the training process itself: no exception handler, no teardown, no last save.
    With ``once`` (a file path) it strikes once, as a node failure would: the resumed run, which
    replays the run's overrides and so builds this callback again, trains on."""

    def __init__(self, epoch: int, batch: int, once: str | None = None) -> None:
        super().__init__(epoch, batch)
        self.once = once

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            import os
            import signal
            from pathlib import Path

            if self.once is not None:
                if Path(self.once).exists():
                    return
                Path(self.once).touch()
            os.kill(os.getpid(), signal.SIGKILL)


class InterruptAt(CrashAt):
    """Ctrl-C (SIGINT's KeyboardInterrupt) mid-epoch, which Lightning catches and turns into exit code 1."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise KeyboardInterrupt
