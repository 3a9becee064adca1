"""What jobs build from configs: Hydra instantiation that lets eenn's errors through, the network a
config describes, and a finished stage-1 run's network and data module rebuilt from its saved config."""

from __future__ import annotations

import re
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from eenn.checkpoints import load_weights
from eenn.errors import EENNError
from eenn.models.multi_exit import MultiExitNetwork, build_multi_exit
from eenn.rundir import TrainRun


def instantiate(cfg: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets eenn's own one-sentence errors through unwrapped
    (Hydra wraps every exception of a target in an InstantiationException with the full key)."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, EENNError):
            unknown = (
                re.search(r"unexpected keyword argument '(\w+)'", str(cause)) if isinstance(cause, TypeError) else None
            )
            if unknown and isinstance(cfg, DictConfig):  # a key added with + that the target does not take
                node = cfg._get_full_key(None) or "the config"
                raise EENNError(f"{node}.{unknown[1]}: {cfg.get('_target_')} takes no option {unknown[1]!r}.") from None
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def build_network(cfg: DictConfig, dm: Any) -> MultiExitNetwork:
    """The multi-exit network of a stage-1 config (``backbone``, ``exits``) for data module ``dm``."""
    return build_multi_exit(
        OmegaConf.to_container(cfg.backbone, resolve=True),  # type: ignore[arg-type]
        OmegaConf.to_container(cfg.exits, resolve=True),  # type: ignore[arg-type]
        num_classes=dm.num_classes,
        input_shape=dm.input_shape,
    )


def load_network(run: TrainRun, checkpoint: str = "best", dm: Any = None) -> MultiExitNetwork:
    """The run's network, rebuilt from its config for the data module ``dm`` (default: the run's
    own data), with the checkpoint's weights, in eval mode."""
    network = build_network(run.config(), dm if dm is not None else datamodule(run))
    load_weights(network, run.checkpoint(checkpoint), "checkpoint", prefix="network.")
    return network.eval()


def datamodule(run: TrainRun, overrides: Any = None) -> Any:
    """The run's data module from its config, with ``overrides`` of the data config merged in
    (e.g. another data.root on another machine)."""
    return instantiate(OmegaConf.merge(run.config().data, overrides or {}), _convert_="all")
