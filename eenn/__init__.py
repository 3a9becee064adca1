"""eenn: early-exit neural networks with PyTorch Lightning + Hydra.

The Python API (:mod:`eenn.api`) is imported on first use, so that ``import eenn`` stays light::

    import eenn
    model = eenn.load("outputs/train/runs/<run>", policy="outputs/fit/runs/<fit>")
    out = model.predict(x)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: what ``eenn.<name>`` gives, from eenn.api
API = ("EarlyExitModel", "Output", "evaluate", "fit_policy", "from_pretrained", "load", "load_split")
__all__ = ["__version__", *API]

if TYPE_CHECKING:
    from eenn.api import EarlyExitModel, Output, evaluate, fit_policy, from_pretrained, load, load_split  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in API:
        from eenn import api

        return getattr(api, name)
    raise AttributeError(f"module 'eenn' has no attribute {name!r}")
