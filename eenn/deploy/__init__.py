"""Deploy a trained early-exit model: a bundle of per-segment ONNX graphs and a runtime that runs
them with real early exit in ONNX Runtime, needing numpy and onnxruntime only (no PyTorch).

- :mod:`eenn.deploy.export` (PyTorch side, what ``eenn-export`` calls) writes and checks a bundle,
  each exit's decision traced from the fitted policy into its segment's graph;
- :mod:`eenn.deploy.bundle` reads and verifies one; :mod:`eenn.deploy.runtime` runs it.

Importing this package imports neither torch nor the export module.
"""

from eenn.deploy.bundle import Bundle
from eenn.deploy.runtime import Prediction, Runtime

__all__ = ["Bundle", "Prediction", "Runtime"]
