"""Online inference that really skips layers: the early-exit engine (batch compaction), rebatching
for streams, the edge/cloud partition simulation and the Distiller-style cost report."""

from eenn.inference.engine import EarlyExitEngine, ExitResult, batches_of, single_samples, time_backbone
from eenn.inference.rebatch import Rebatcher

__all__ = ["EarlyExitEngine", "ExitResult", "Rebatcher", "batches_of", "single_samples", "time_backbone"]
