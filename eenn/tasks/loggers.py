"""Loggers that never prompt or hang: wandb goes offline by itself when no credentials exist;
TensorBoard writes event files and MLflow a local store (SQLite, no server), both in files only."""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from eenn.errors import EENNError

WANDB_MODES = ("auto", "online", "offline", "disabled")


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str = "auto", key: str = "logger.wandb.mode") -> str:
    """``WANDB_MODE`` in the environment wins; ``auto`` is online with credentials, else offline.
    ``key`` names the config key in the error for a bad mode."""
    if mode not in WANDB_MODES:
        raise EENNError(f"{key} must be one of {WANDB_MODES}, got {mode!r}.")
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled", "dryrun"):
        return "offline" if env == "dryrun" else env
    if mode == "auto":
        return "online" if wandb_credentials_present() else "offline"
    return mode


def wandb_logger(
    enabled: bool = True,
    project: str = "eenn",
    save_dir: str = ".",
    mode: str = "auto",
    name: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    tags: list[str] | None = None,
    entity: str | None = None,
    **kwargs: Any,
) -> WandbLogger | None:
    """Lightning's wandb logger with eenn's rules (see :func:`resolve_wandb_mode`); None when
    ``enabled`` is false. ``name`` defaults to ``job_type`` (the app)."""
    if not enabled:
        return None
    mode = resolve_wandb_mode(mode)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project,
        save_dir=save_dir,
        name=name or job_type,
        group=group,
        job_type=job_type,
        tags=tags,
        entity=entity,
        offline=mode == "offline",
        mode=mode,
        **kwargs,
    )


def init_wandb_run(
    project: str = "eenn",
    dir: str | Path = ".",  # noqa: A002  (wandb.init's name for it)
    mode: str = "auto",
    key: str = "wandb.mode",
    **kwargs: Any,
) -> Any:
    """A wandb run outside Lightning (stage 2's fits, eenn-compare) with the same rules as
    :func:`wandb_logger`: the mode settled by :func:`resolve_wandb_mode` (offline without
    credentials, never a prompt), files under ``dir/wandb/``, no console capture, and any run
    still active in this process finished first, so jobs of an in-process multirun never log into
    each other's runs. ``kwargs`` go to ``wandb.init`` (group, job_type, name, config, tags, ...)."""
    import wandb  # here: importing wandb takes seconds, and jobs that log nothing never pay for it

    mode = resolve_wandb_mode(mode, key)
    Path(dir).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=project,
        dir=str(dir),
        mode=mode,
        reinit="finish_previous",
        settings=wandb.Settings(console="off", silent=True),
        **kwargs,
    )


def start_wandb_run(
    settings: Mapping[str, Any] | None,
    dir: str | Path,
    job_type: str,
    name: str,
    group: str | None,  # noqa: A002
    config: dict[str, Any] | None = None,
) -> Any:
    """The wandb run of a job outside Lightning, from the ``wandb:`` config every app shares
    (conf/wandb/default.yaml): None when ``enabled`` is false; ``name`` and ``group`` are the
    job's own defaults for the settings left null."""
    if not settings or not settings.get("enabled", True):
        return None
    return init_wandb_run(
        project=settings.get("project", "eenn"),
        dir=dir,
        mode=settings.get("mode", "auto"),
        key="wandb.mode",
        entity=settings.get("entity"),
        group=settings.get("group") or group,
        job_type=job_type,
        name=settings.get("name") or name,
        tags=list(settings.get("tags") or []),
        config=config,
    )


def finish_wandb() -> None:
    """End the active wandb run, so the next job of a multirun does not log into it."""
    wandb = sys.modules.get("wandb")  # never imported: no run to end
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def _needs(what: str, modules: Sequence[str], extra: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise EENNError(f"{what} needs {', '.join(missing)}: pip install 'eenn[{extra}]'.")


def tensorboard_logger(save_dir: str, name: str = "tensorboard", version: str = "") -> TensorBoardLogger:
    """Lightning's TensorBoard logger: event files in ``save_dir/name`` (``tensorboard --logdir``)."""
    _needs("logger=tensorboard", ["tensorboard"], "tensorboard")
    # no hp_metric placeholder (-1): the run's metrics are logged under their own names
    return TensorBoardLogger(save_dir=save_dir, name=name, version=version, default_hp_metric=False)


def mlflow_logger(
    store: str,
    save_dir: str,
    experiment_name: str = "eenn",
    job_type: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> MLFlowLogger:
    """Lightning's MLflow logger on a local store: a SQLite database ``store/mlflow.db`` (the file
    store is frozen in MLflow 3) and artifacts under ``store/artifacts``; no server. The run is
    named after its run dir (``save_dir``) and tagged with its path and app."""
    _needs("logger=mlflow", ["mlflow", "sqlalchemy", "alembic"], "mlflow")
    root = Path(store).resolve()
    root.mkdir(parents=True, exist_ok=True)
    run_dir = Path(save_dir).resolve()
    return MLFlowLogger(
        experiment_name=experiment_name,
        run_name=run_dir.name,
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        artifact_location=str(root / "artifacts"),
        tags={"run_dir": str(run_dir), **({"app": job_type} if job_type else {}), **dict(tags or {})},
    )


def log_table(loggers: Sequence[Logger], key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table, in each logger's own form: a wandb Table; a TensorBoard text (markdown, under
    ``key``); an MLflow table artifact ``<key>_table.json`` (columns and data, the layout of
    mlflow.log_table's). Others (CSV) keep no tables."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.log_table(key=key, columns=list(columns), data=[list(r) for r in rows])
        elif isinstance(lg, TensorBoardLogger):
            lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
            lg.experiment.add_text(key, "\n".join(lines), global_step=0)
        elif isinstance(lg, MLFlowLogger):
            table = {"columns": list(columns), "data": [list(r) for r in rows]}
            lg.experiment.log_dict(lg.run_id, json.loads(json.dumps(table, default=str)), f"{key}_table.json")
