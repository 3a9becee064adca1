"""Run directories as objects: what each stage leaves in its directory, named in this module only.

Every eenn app is a Hydra job whose run dir holds what it made, and the next stage takes that dir
as its input. The objects here know the files; every other module asks them:

- :class:`Stage1Run` (eenn-train): ``.hydra/config.yaml`` (Hydra writes it), ``checkpoints/``
  (``best.ckpt``, ``last.ckpt``), ``costs.json``, ``predictions/{val,test}.safetensors`` and, once
  finished, ``metrics.json``;
- :class:`FitRun` (eenn-fit): ``policy.safetensors`` and ``metrics.json``;
- :class:`InferRun` (eenn-infer): ``infer.json``;
- :class:`CompareRun` (eenn-compare): ``results.csv``, the plots (PNG) and ``report.html``;
- :class:`PipelineRun` (eenn-pipeline): a Stage1Run in ``train/``, a FitRun per job in ``fit/``
  and a CompareRun in ``compare/``;
- a job of a sweep that failed leaves ``error.json`` instead of its results.

Every file a stage writes goes through its run object's ``write_*`` methods, and checkpoints load
through :func:`load_weights` alone (``weights_only=True``: no pickled code runs). So the rules for
a run dir, such as "a finished run is written into again only when resumed or forced" and "a lock
file keeps a second job out", have one place to live.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from eenn.cost import CostProfile
from eenn.errors import EENNError
from eenn.models.multi_exit import MultiExitNetwork
from eenn.policies.base import ExitPolicy
from eenn.predictions import SPLITS, Predictions
from eenn.utils.config import build_network, instantiate
from eenn.utils.io import read_json, write_json

log = logging.getLogger("eenn")

HYDRA_DIR = ".hydra"  # Hydra's own: the job's composed config and overrides
ERROR_FILE = "error.json"


class RunDir:
    """What every run dir has: Hydra's saved config, ``metrics.json`` once the job finished, and
    ``error.json`` when it failed in a sweep."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    # --------------------------------------------------------------------- config
    @property
    def config_file(self) -> Path:
        return self.path / HYDRA_DIR / "config.yaml"

    def has_config(self) -> bool:
        return self.config_file.is_file()

    def config(self) -> DictConfig:
        """The job's composed config, as Hydra saved it (in today's key names)."""
        if not self.has_config():
            raise EENNError(f"{str(self.path)!r} holds no {HYDRA_DIR}/config.yaml: it is not the run dir of an eenn app.")
        cfg: DictConfig = OmegaConf.load(self.config_file)  # type: ignore[assignment]
        _rename_registry_keys(cfg)
        return cfg

    # -------------------------------------------------------------------- metrics
    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    def finished(self) -> bool:
        """The job wrote its metrics, its last file."""
        return self.metrics_file.is_file()

    def metrics(self) -> dict[str, Any]:
        return read_json(self.metrics_file, "metrics file")

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.metrics_file, metrics)

    # --------------------------------------------------------------------- errors
    @property
    def error_file(self) -> Path:
        return self.path / ERROR_FILE

    def failed(self) -> bool:
        return self.error_file.is_file()

    def write_error(self, exc: BaseException, overrides: list[str]) -> None:
        """Record a failed job of a sweep (eenn-compare lists it): a bad input is its one sentence,
        anything else carries its traceback."""
        write_json(self.error_file, {
            "type": type(exc).__name__,
            "message": str(exc),
            "overrides": overrides,
            "traceback": "" if isinstance(exc, EENNError) else traceback.format_exc(),
        })

    def clear_error(self) -> None:
        self.error_file.unlink(missing_ok=True)

    def failure(self) -> str:
        """Why the job has no metrics: its error.json's message, or that it never finished."""
        if self.failed():
            return str(read_json(self.error_file, "error file").get("message", "failed"))
        return "no metrics.json (failed or unfinished)"

    def remove_if_only_hydra_files(self, job_name: str) -> None:
        """Remove the run dir of a refused job when it holds nothing but Hydra's config and log:
        a run dir with anything more (a resumed run's checkpoints, say) is never deleted."""
        if not self.path.is_dir():
            return
        own = {HYDRA_DIR, f"{job_name}.log"}
        if all(p.name in own for p in self.path.iterdir()):
            logging.shutdown()  # Hydra's log handler holds <job>.log open
            shutil.rmtree(self.path, ignore_errors=True)


class Stage1Run(RunDir):
    """An eenn-train run dir: config, checkpoints, cost profile, predictions, metrics."""

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, which: str = "best", key: str = "checkpoint") -> Path:
        """``best`` or ``last``: this run's checkpoint; anything else is a checkpoint path. A
        missing file is an EENNError naming ``key``."""
        if which in ("best", "last"):
            path = self.checkpoint_dir / f"{which}.ckpt"
            if not path.is_file():
                raise EENNError(f"{key}={which!r}: {str(path)!r} does not exist.")
            return path
        path = Path(which)
        if not path.is_file():
            raise EENNError(f"{key}={which!r} does not exist.")
        return path

    def resume_checkpoint(self, ckpt_path: str | None) -> Path | None:
        """The checkpoint a training resumes from: ``last`` is this run dir's last checkpoint if it
        has one, else a fresh start (what a requeued SLURM job wants); a path must exist and be a
        readable checkpoint."""
        if not ckpt_path:
            return None
        if ckpt_path == "last" and not (self.checkpoint_dir / "last.ckpt").is_file():
            log.info("ckpt_path=last: no last checkpoint in %s yet, starting from scratch", self.checkpoint_dir)
            return None
        path = self.checkpoint(ckpt_path, key="ckpt_path")
        checkpoint_state(path, "ckpt_path")
        return path

    def load_network(self, checkpoint: str = "best", dm: Any = None) -> MultiExitNetwork:
        """The run's network, rebuilt from its config for the data module ``dm`` (default: the
        run's own data), with the checkpoint's weights, in eval mode."""
        network = build_network(self.config(), dm if dm is not None else self.datamodule())
        load_weights(network, self.checkpoint(checkpoint), "checkpoint", prefix="network.")
        return network.eval()

    def datamodule(self, overrides: Any = None) -> Any:
        """The run's data module from its config, with ``overrides`` of the data config merged in
        (e.g. another data.root on another machine)."""
        return instantiate(OmegaConf.merge(self.config().data, overrides or {}), _convert_="all")

    # -------------------------------------------------------------------- costs
    @property
    def costs_file(self) -> Path:
        return self.path / "costs.json"

    def costs(self) -> CostProfile:
        if not self.costs_file.is_file():
            raise EENNError(f"run_dir={str(self.path)!r} has no costs.json: was its training run finished?")
        return CostProfile.from_dict(read_json(self.costs_file, "cost profile"))

    def write_costs(self, costs: CostProfile) -> None:
        write_json(self.costs_file, costs.to_dict())

    # -------------------------------------------------------------- predictions
    PREDICTIONS = "predictions"

    def predictions_file(self, split: str) -> Path:
        return self.path / self.PREDICTIONS / f"{split}.safetensors"

    @classmethod
    def holding(cls, predictions_file: str | Path) -> Stage1Run:
        """The run a predictions file lies in (its ``predictions/`` folder), or the folder holding
        the file when it lies elsewhere (predictions written by another tool)."""
        folder = Path(predictions_file).resolve().parent
        return cls(folder.parent if folder.name == cls.PREDICTIONS else folder)

    def has_predictions(self) -> bool:
        return all(self.predictions_file(s).is_file() for s in SPLITS)

    def predictions(self, split: str) -> Predictions:
        path = self.predictions_file(split)
        if not path.is_file():
            raise EENNError(f"stage-1 run dir {str(self.path)!r} lacks {str(path)!r}: is it an eenn-train run dir "
                            "of this version?")
        return Predictions.load(path)

    def write_predictions(self, preds: Predictions) -> None:
        preds.save(self.predictions_file(preds.split))

    # --------------------------------------------------------------- what it is
    @property
    def name(self) -> str:
        """The model's name in comparisons and wandb groups: the run dir's name, or for a
        pipeline's stage-1 run (``<pipeline>/train``) the pipeline's name, which says more."""
        return self.path.parent.name if self.path.name == PipelineRun.TRAIN else self.path.name

    def training(self) -> str:
        """``joint``, ``bilevel``...: from metrics.json (older runs: their config's training target)."""
        if self.finished() and "training" in (m := self.metrics()):
            return str(m["training"])
        if not self.has_config():
            return "unknown"
        target = str(self.config().get("training", {}).get("_target_", ""))
        return target.rsplit(".", 1)[-1].replace("Training", "").lower() or "unknown"


class FitRun(RunDir):
    """An eenn-fit run dir: the fitted policy and its metrics."""

    @property
    def policy_file(self) -> Path:
        return self.path / "policy.safetensors"

    def policy(self) -> ExitPolicy:
        return ExitPolicy.load(self.policy_file)

    def write_policy(self, policy: ExitPolicy) -> None:
        policy.save(self.policy_file)

    def source_run(self) -> Stage1Run | None:
        """The stage-1 run the fit used: its metrics' ``source_run``, else its config's ``run_dir``."""
        source = self.metrics().get("source_run") if self.finished() else None
        if not source and self.has_config():
            source = self.config().get("run_dir")
        return Stage1Run(source) if source else None

    def is_job(self) -> bool:
        """Whether this dir is a fit job (finished, failed or started), not a folder of jobs."""
        return self.finished() or self.failed() or (self.path / HYDRA_DIR).is_dir()


def fit_runs(path: str | Path) -> list[FitRun]:
    """A fit run dir itself, or the jobs of a sweep dir (finished, failed or unfinished ones)."""
    run = FitRun(path)
    if run.finished() or run.failed():
        return [run]
    return sorted((FitRun(d) for d in run.path.iterdir() if d.is_dir() and FitRun(d).is_job()), key=lambda r: r.path)


def failed_jobs(sweep_dir: str | Path) -> list[str]:
    """The names of a sweep's jobs that recorded a failure."""
    return sorted(d.name for d in Path(sweep_dir).iterdir() if d.is_dir() and RunDir(d).failed())


class InferRun(RunDir):
    """An eenn-infer run dir: ``infer.json``."""

    @property
    def result_file(self) -> Path:
        return self.path / "infer.json"

    def write_result(self, result: dict[str, Any]) -> None:
        write_json(self.result_file, result)


class CompareRun(RunDir):
    """An eenn-compare run dir: results.csv, the plots and report.html."""

    @property
    def results_file(self) -> Path:
        return self.path / "results.csv"

    @property
    def report_file(self) -> Path:
        return self.path / "report.html"

    def figure_file(self, name: str) -> Path:
        return self.path / f"{name}.png"

    def results(self) -> list[dict[str, Any]]:
        """The rows of results.csv as dicts, numbers parsed (for notebooks)."""
        if not self.results_file.is_file():
            raise EENNError(f"{str(self.results_file)!r} does not exist: run eenn-compare or eenn-pipeline first.")
        with open(self.results_file) as fh:
            rows = list(csv.DictReader(fh))
        for r in rows:
            for k in ("budget_fraction", "budget", "val_accuracy", "test_accuracy", "val_avg_cost", "test_avg_cost"):
                r[k] = float(r[k])
            r["test_exit_fractions"] = json.loads(r["test_exit_fractions"])
        return rows


class PipelineRun(RunDir):
    """An eenn-pipeline dir: its stage-1 run, one fit run per job, and the comparison."""

    TRAIN = "train"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def train(self) -> Stage1Run:
        return Stage1Run(self.path / self.TRAIN)

    @property
    def fit_dir(self) -> Path:
        return self.path / "fit"

    def fit(self, job: str) -> FitRun:
        return FitRun(self.fit_dir / job)

    @property
    def compare(self) -> CompareRun:
        return CompareRun(self.path / "compare")

    def results(self) -> list[dict[str, Any]]:
        """The pipeline's results table (compare/results.csv), for notebooks."""
        return self.compare.results()


def _rename_registry_keys(cfg: DictConfig) -> None:
    """Runs saved before every registry key was ``name`` say ``backbone.family`` (with a timm
    backbone's model in ``backbone.name``) and ``exits.head.type``: read them as they are said now."""
    backbone, head = cfg.get("backbone"), OmegaConf.select(cfg, "exits.head")
    if backbone is not None and "family" in backbone:
        if "name" in backbone:
            backbone.model = backbone.pop("name")
        backbone.name = backbone.pop("family")
    if head is not None and "type" in head:
        head.name = head.pop("type")


# --------------------------------------------------------------------------- checkpoints
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
    wrong = [(k, tuple(weights[k].shape), tuple(v.shape)) for k, v in own.items() if k in weights and weights[k].shape != v.shape]
    if missing or wrong:
        detail = (f"{len(wrong)} tensors differ in shape, e.g. {wrong[0][0]}: checkpoint {wrong[0][1]} vs model {wrong[0][2]}"
                  if wrong else f"{len(missing)} tensors are missing, e.g. {missing[0]}")
        raise EENNError(f"{key}={str(path)!r} does not fit this model ({detail}); was it trained with another "
                        "backbone, exits or number of classes?")
    return weights


def check_fits(module: nn.Module, path: str | Path, key: str) -> None:
    """Refuse, before Lightning loads it, a checkpoint to resume from that is not this module's."""
    _fitting_weights(module, path, key, prefix="")


def load_weights(module: nn.Module, path: str | Path, key: str, prefix: str = "") -> None:
    """Load a Lightning checkpoint's weights into ``module``: the entries under ``prefix`` (e.g.
    ``network.`` for a stage-1 network, none for the whole training module). ``key`` names the
    checkpoint in errors."""
    module.load_state_dict(_fitting_weights(module, path, key, prefix))
