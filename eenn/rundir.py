"""Run directories as objects: what each stage leaves in its directory, named in this module only.

Every eenn app is a Hydra job whose run dir holds what it made, and the next stage takes that dir
as its input. The objects here know the files; every other module asks them:

- :class:`TrainRun` (eenn-train): ``.hydra/config.yaml`` (Hydra writes it), ``checkpoints/``
  (``best.ckpt``, ``last.ckpt``), ``costs.json``, ``predictions/{val,test}.safetensors`` and, once
  finished, ``metrics.json``;
- :class:`FitRun` (eenn-fit): ``policy.safetensors`` and ``metrics.json``;
- :class:`InferRun` (eenn-infer): ``infer.json``;
- :class:`ExportRun` (eenn-export): the deployment bundle in ``bundle/``;
- :class:`CompareRun` (eenn-compare): ``results.csv``, the plots (PNG) and ``report.html``;
- :class:`PipelineRun` (eenn-pipeline): a TrainRun in ``train/``, a FitRun per job in ``fit/``
  and a CompareRun in ``compare/``;
- a job of a sweep that failed leaves ``error.json`` instead of its results.

Every file a stage writes goes through its run object's ``write_*`` methods. What a run dir's
objects do beyond knowing its files lives beside them, one concern a module: a run's lifecycle
(claiming the dir, the forced redo's swap: :mod:`eenn.claims`, which inherits its lock from
:mod:`eenn.locking`), reading checkpoints (:mod:`eenn.checkpoints`: ``weights_only=True``, no
pickled code runs), saving and comparing configs (:mod:`eenn.configs`: resolved, with absolute
paths, so that a run dir works from any working directory), and rebuilding a run's network and
data (:mod:`eenn.tasks.build`, for the jobs).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import traceback
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from eenn.checkpoints import checkpoint_state
from eenn.claims import ASIDE, REPLACE_DIRS, Claimable
from eenn.configs import config_differences, rename_registry_keys, resolved_config
from eenn.cost import CostProfile
from eenn.deploy.bundle import BUNDLE_DIR, MANIFEST
from eenn.errors import EENNError, is_number
from eenn.locking import LOCK_FILE
from eenn.policies.base import ExitPolicy
from eenn.predictions import SPLITS, Predictions
from eenn.utils.io import atomic_path, read_json, write_json
from eenn.utils.nested import flatten

log = logging.getLogger("eenn")

HYDRA_DIR = ".hydra"  # Hydra's own: the job's composed config and overrides
ERROR_FILE = "error.json"
#: what Hydra writes into a run or sweep dir before a job starts (besides <job>.log), and the lock:
#: a dir holding nothing else holds no job's results
HYDRA_FILES = (HYDRA_DIR, "multirun.yaml", LOCK_FILE)
#: the longest figure file name before ".png", with room for atomic_path's temporary prefix and suffix
FIGURE_STEM = 200


class RunDir(Claimable):
    """What every run dir has: Hydra's saved config, ``metrics.json`` once the job finished, and
    ``error.json`` when it failed in a sweep."""

    #: the app (its config's task_name) whose run dirs these are
    APP: ClassVar[str] = ""

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
            raise EENNError(
                f"{str(self.path)!r} holds no {HYDRA_DIR}/config.yaml: it is not the run dir of an eenn app."
            )
        cfg: DictConfig = OmegaConf.load(self.config_file)  # type: ignore[assignment]
        rename_registry_keys(cfg)
        return cfg

    @property
    def overrides_file(self) -> Path:
        return self.path / HYDRA_DIR / "overrides.yaml"

    def overrides(self, key: str = "run_dir") -> list[str]:
        """The command-line overrides the job was started with, as Hydra saved them; a dir without
        them is an EENNError naming ``key``."""
        if not self.overrides_file.is_file():
            raise EENNError(
                f"{key}={str(self.path)!r} is not an eenn-{self.APP} run dir (no {HYDRA_DIR}/overrides.yaml in it)."
            )
        return [str(o) for o in OmegaConf.load(self.overrides_file)]

    def write_config(self, cfg: DictConfig) -> None:
        """Save the job's config as this run's: resolved, with absolute paths (Hydra saves it
        unresolved, and its relative paths would then follow the working directory of whoever
        reads it)."""
        with atomic_path(self.config_file) as tmp:
            OmegaConf.save(OmegaConf.create(resolved_config(cfg, self.path)), tmp)

    def saved_app(self) -> str | None:
        """The app that made this run dir, from its saved config's task_name (None: no config)."""
        if not self.has_config():
            return None
        try:
            app = OmegaConf.load(self.config_file).get("task_name")
        except Exception:  # noqa: BLE001  (a broken config says nothing about its app)
            return None
        return None if app is None else str(app)

    def check_app(self, key: str) -> None:
        """Refuse, naming ``key``, another eenn app's run dir given where one of :attr:`APP`'s is
        expected (a dir of no app is left to the checks of the files it lacks)."""
        saved = self.saved_app()
        if saved is not None and saved != self.APP:
            raise EENNError(
                f"{key}={str(self.path)!r} is an eenn-{saved} run dir; {key} takes an eenn-{self.APP} run dir."
            )

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
        write_json(
            self.error_file,
            {
                "type": type(exc).__name__,
                "message": str(exc),
                "overrides": overrides,
                "traceback": "" if isinstance(exc, EENNError) else traceback.format_exc(),
            },
        )

    def clear_error(self) -> None:
        self.error_file.unlink(missing_ok=True)

    def failure(self) -> str:
        """Why the job has no metrics: its error.json's message, or that it never finished."""
        if self.failed():
            return str(read_json(self.error_file, "error file").get("message", "failed"))
        return "no metrics.json (failed or unfinished)"

    # ------------------------------------------------------------ claim and lock
    def outputs(self) -> list[str]:
        """What jobs made in this dir: every entry but Hydra's files, logs and the lock."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name not in HYDRA_FILES and p.suffix != ".log")

    def resumes(self, cfg: DictConfig) -> bool:
        """Whether the job ``cfg`` continues this run (so it may write into its files)."""
        return False

    def resume_hint(self) -> str:
        return ""

    def _settler(self) -> RunDir:
        """This dir as the run dir object whose rules settle it, whatever object this is: a sweep's
        where it holds a multirun's jobs, else that of the app whose run (old or new) it holds."""
        places = [self.path, *(self.path / name for name in REPLACE_DIRS)]
        if any((p / "multirun.yaml").is_file() for p in places):
            return SweepDir(self.path)
        apps = [RunDir(p).saved_app() for p in places]
        return next((RUN_TYPES[a](self.path) for a in apps if a in RUN_TYPES), self)


class TrainRun(RunDir):
    """An eenn-train run dir: config, checkpoints, cost profile, predictions, metrics."""

    APP = "train"

    def resumes(self, cfg: DictConfig) -> bool:
        """``ckpt_path=last``, or a checkpoint of this run's own."""
        ckpt = cfg.get("ckpt_path")
        return ckpt == "last" or (bool(ckpt) and Path(str(ckpt)).resolve().parent == self.checkpoint_dir.resolve())

    def resume_hint(self) -> str:
        return " but to resume it (resume=<run dir>)"

    #: what a resumed run may set otherwise than the run did: how and where it trains on, not what
    RESUME_MAY_CHANGE = (
        "resume",
        "force",
        "ckpt_path",
        "trainer",
        "callbacks",
        "logger",
        "wandb",
        "paths",
        "data.root",
        "data.num_workers",
        "cost",
    )

    def check_resumable(self, force: bool = False) -> None:
        """``resume=<this dir>``: refused, naming the dir, when it is not an eenn-train run and,
        unless ``force`` restarts it, when it is finished or stopped before its first checkpoint
        (only inside a SLURM job, whose first start and requeues share the command, does that
        start it afresh)."""
        self.settle()
        self.check_app("resume")
        self.overrides(key="resume")  # refuses a dir no job ran in
        if force:
            return
        if self.finished():
            raise EENNError(
                f"resume={str(self.path)!r}: the run is finished; there is nothing to resume (force=true redoes it)."
            )
        if not self.last_checkpoint.is_file() and "SLURM_JOB_ID" not in os.environ:
            raise EENNError(
                f"resume={str(self.path)!r}: the run stopped before its first checkpoint, so there is "
                "nothing to resume; add force=true to restart it from scratch with its own overrides."
            )

    def check_resume(self, cfg: DictConfig) -> None:
        """``resume=<this dir>``: the job must run in this dir with the config the run was made
        with, up to :attr:`RESUME_MAY_CHANGE`; another config is refused, naming the keys."""
        if Path(str(cfg.paths.output_dir)).resolve() != self.path.resolve():
            raise EENNError(
                f"resume={str(self.path)!r} runs in that dir, but paths.output_dir is {str(cfg.paths.output_dir)!r}."
            )
        if not self.has_config():
            raise EENNError(
                f"resume={str(self.path)!r} holds no saved config ({HYDRA_DIR}/config.yaml): it is not a "
                "stage-1 run that started training."
            )
        saved, unresolved = OmegaConf.load(self.config_file), set()
        try:  # saved resolved once training started; a run that crashed before holds Hydra's own
            before = flatten(OmegaConf.to_container(saved, resolve=True))
        except OmegaConfBaseException:  # with interpolations only Hydra resolves (${hydra:...}): those not compared
            before = flatten(OmegaConf.to_container(saved))
            unresolved = {k for k, v in before.items() if isinstance(v, str) and "${" in v}
        before, now = (
            {k: v for k, v in flat.items() if k not in unresolved}
            for flat in (before, flatten(resolved_config(cfg, self.path)))
        )
        differ = config_differences(before, now, self.RESUME_MAY_CHANGE)
        if differ:
            raise EENNError(
                f"resume={str(self.path)!r}: today's configs compose differently from the run's saved "
                f"config ({differ}); resume with the eenn the run was made with, or set those keys "
                "back on the command line."
            )

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        """Where the newest checkpoint goes (what ``ckpt_path=last`` resumes from)."""
        return self.checkpoint_dir / "last.ckpt"

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
        """The checkpoint a training resumes from: ``last`` is this run dir's last checkpoint; a
        path must exist and be a readable checkpoint. ``last`` in a dir without one starts afresh
        only inside a SLURM job, whose first start and every requeue run the same command in the
        same dir; anywhere else it is refused, since the user meant to continue something."""
        if not ckpt_path:
            return None
        if ckpt_path == "last" and not self.last_checkpoint.is_file():
            if "SLURM_JOB_ID" not in os.environ:
                raise EENNError(
                    f"ckpt_path=last: {str(self.last_checkpoint)!r} does not exist, so there is "
                    "nothing to resume; to continue a crashed run pass resume=<its run dir>, to start a "
                    "new one leave ckpt_path out."
                )
            log.info(
                "ckpt_path=last: no last checkpoint in %s yet (the job's first start), training from scratch",
                self.checkpoint_dir,
            )
            return None
        path = self.checkpoint(ckpt_path, key="ckpt_path")
        checkpoint_state(path, "ckpt_path")
        return path

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
    def holding(cls, predictions_file: str | Path) -> TrainRun:
        """The run a predictions file lies in (its ``predictions/`` folder), or the folder holding
        the file when it lies elsewhere (predictions written by another tool)."""
        folder = Path(predictions_file).resolve().parent
        return cls(folder.parent if folder.name == cls.PREDICTIONS else folder)

    def has_predictions(self) -> bool:
        return all(self.predictions_file(s).is_file() for s in SPLITS)

    def predictions(self, split: str) -> Predictions:
        path = self.predictions_file(split)
        if not path.is_file():
            raise EENNError(
                f"stage-1 run dir {str(self.path)!r} lacks {str(path)!r}: is it an eenn-train run dir of this version?"
            )
        return Predictions.load(path)

    def write_predictions(self, preds: Predictions) -> None:
        preds.save(self.predictions_file(preds.split))

    # --------------------------------------------------------------- what it is
    @property
    def name(self) -> str:
        """The model's name in comparisons and wandb groups: the run dir's name; for a job of a
        sweep, ``<sweep dir>/<job dir>``, since two sweeps with the same override name their jobs
        alike (``0_backbone=resnet20``); for a pipeline's stage-1 run (``<pipeline>/train``) the
        pipeline's name, which says more."""
        if self.path.name == PipelineRun.TRAIN:
            return self.path.parent.name
        if (self.path.parent / "multirun.yaml").is_file():
            return f"{self.path.parent.name}/{self.path.name}"
        return self.path.name

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

    APP = "fit"
    #: what an eenn-fit metrics.json holds for eenn-compare, at the top and per split
    METRICS_KEYS = ("policy", "budget", "budget_fraction", "cost_unit", "val", "test")
    SPLIT_KEYS = ("accuracy", "avg_cost", "exit_fractions")

    def metrics(self) -> dict[str, Any]:
        """The fit's metrics; a file that is not an eenn-fit result is an EENNError naming it."""
        m = super().metrics()
        missing = [k for k in self.METRICS_KEYS if not isinstance(m, dict) or k not in m]
        if not missing:
            missing = [
                f"{s}.{k}" for s in SPLITS for k in self.SPLIT_KEYS if not isinstance(m[s], dict) or k not in m[s]
            ]
        if missing:
            raise EENNError(f"metrics file {str(self.metrics_file)!r} is not an eenn-fit result (it lacks {missing}).")
        # checked as read: a comparison formats them, and would fail halfway through its outputs
        wrong = [f"{s}.{k}" for s in SPLITS for k in ("accuracy", "avg_cost") if not is_number(m[s][k])]
        wrong += [
            f"{s}.exit_fractions"
            for s in SPLITS
            if not isinstance(m[s]["exit_fractions"], list) or not all(is_number(f) for f in m[s]["exit_fractions"])
        ]
        if wrong:
            raise EENNError(
                f"metrics file {str(self.metrics_file)!r} holds no number in {wrong[0]} (got "
                f"{flatten(m).get(wrong[0])!r}): was it edited by hand?"
            )
        return m

    @property
    def policy_file(self) -> Path:
        return self.path / "policy.safetensors"

    def policy(self) -> ExitPolicy:
        return ExitPolicy.load(self.policy_file)

    def write_policy(self, policy: ExitPolicy) -> None:
        policy.save(self.policy_file)

    def source_run(self) -> TrainRun | None:
        """The stage-1 run the fit used: its metrics' ``source_run``, else its config's ``run_dir``."""
        source = self.metrics().get("source_run") if self.finished() else None
        if not source and self.has_config():
            source = self.config().get("run_dir")
        return TrainRun(source) if source else None

    def is_job(self) -> bool:
        """Whether this dir is a fit job (finished, failed or started), not a folder of jobs."""
        return self.finished() or self.failed() or (self.path / HYDRA_DIR).is_dir()


def fit_runs(path: str | Path) -> list[FitRun]:
    """The fit jobs (finished, failed or unfinished) of a fit run dir itself, a sweep dir of fits,
    a pipeline dir (its ``fit/`` jobs), or a sweep dir of pipelines (each job's fits)."""
    path = Path(path)
    RunDir(path).settle()
    if RunDir(path).saved_app() == PipelineRun.APP:
        return fit_runs(PipelineRun(path).fit_dir) if PipelineRun(path).fit_dir.is_dir() else []
    run = FitRun(path)
    if run.finished() or run.failed():
        return [run]
    jobs: list[FitRun] = []
    for d in sorted(p for p in path.iterdir() if p.is_dir()):
        RunDir(d).settle()
        if RunDir(d).saved_app() == PipelineRun.APP:
            jobs += fit_runs(d)
        elif FitRun(d).is_job():
            jobs.append(FitRun(d))
    return jobs


def _job_finished(path: Path) -> bool:
    """Whether ``path`` holds a finished run of the app its saved config names."""
    return path.is_dir() and RUN_TYPES.get(RunDir(path).saved_app() or "", RunDir)(path).finished()


def failed_jobs(sweep_dir: str | Path) -> list[str]:
    """The names of a sweep's jobs that recorded a failure."""
    return sorted(d.name for d in Path(sweep_dir).iterdir() if d.is_dir() and RunDir(d).failed())


class SweepDir(RunDir):
    """A multirun's dir: a run dir per job. A sweep never runs into a dir holding an earlier
    sweep's jobs (unless forced): Hydra rewrites a job's config and log before the job could see
    that it finished, so finished jobs would be recomputed, not skipped."""

    def _check_outputs(self, force: bool, resume: bool) -> None:
        jobs = self.outputs()
        if jobs and not force:
            raise EENNError(
                f"sweep dir {str(self.path)!r} holds {len(jobs)} jobs of an earlier sweep: a sweep is "
                "never re-run into its dir, as its finished jobs would be recomputed, not skipped; start "
                "a new sweep (leave hydra.sweep.dir to its default), or add force=true to recompute them."
            )

    def _replace_or_restore(self, aside: Path, discard: Path) -> None:
        """Job by job: a job of the earlier sweep that finished comes back unless the forced sweep's
        job of that name finished too (two renames per job, each safe to take up again)."""
        discard.mkdir(exist_ok=True)
        for old in sorted(aside.iterdir()):
            new = self.path / old.name
            if old.is_dir() and _job_finished(old) and not _job_finished(new):
                if new.exists():
                    new.rename(discard / old.name)
                old.rename(new)
        aside.rename(discard / ASIDE)


class InferRun(RunDir):
    """An eenn-infer run dir: ``infer.json``."""

    APP = "infer"

    def finished(self) -> bool:
        return self.result_file.is_file()

    @property
    def result_file(self) -> Path:
        return self.path / "infer.json"

    def result(self) -> dict[str, Any]:
        return read_json(self.result_file, "infer result")

    def write_result(self, result: dict[str, Any]) -> None:
        write_json(self.result_file, result)


class ExportRun(RunDir):
    """An eenn-export run dir: the deployment bundle in ``bundle/`` (:mod:`eenn.deploy.bundle`)."""

    APP = "export"

    def finished(self) -> bool:
        return (self.bundle_dir / MANIFEST).is_file()

    @property
    def bundle_dir(self) -> Path:
        return self.path / BUNDLE_DIR


class CompareRun(RunDir):
    """An eenn-compare run dir: results.csv, the plots and report.html."""

    APP = "compare"

    def finished(self) -> bool:
        return self.report_file.is_file()

    @property
    def results_file(self) -> Path:
        return self.path / "results.csv"

    @property
    def group_results_file(self) -> Path:
        """Per seed group, policy and budget: the statistics over seeds."""
        return self.path / "results_by_group.csv"

    @property
    def report_file(self) -> Path:
        return self.path / "report.html"

    def figure_file(self, name: str) -> Path:
        """Where figure ``name`` goes; a model's name may hold a '/' (a sweep job's), never a path.
        A name too long for a file (a sweep job named by many overrides) keeps its start and a hash
        of the whole, so two figures never share a file."""
        stem = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)
        if len(stem) > FIGURE_STEM:
            stem = f"{stem[: FIGURE_STEM - 9]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"
        return self.path / f"{stem}.png"

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

    APP = "pipeline"
    TRAIN = "train"
    #: what a re-run may change: it adds fits (new names) and logs elsewhere; anything else would
    #: mix results of two configs under one name
    RERUN_MAY_CHANGE = (
        "force",
        "ckpt_path",
        "pipeline.policies",
        "pipeline.budgets",
        "pipeline.num_budgets",
        "wandb",
        "logger",
        "paths",
        "data.root",
        "trainer.enable_progress_bar",
        "compare",
    )

    def stage1_config(self, cfg: DictConfig) -> DictConfig:
        """The pipeline's config as its stage-1 run (``train/``) takes it. A re-run picks up a
        stage 1 that was stopped: from its last checkpoint, or afresh when it made none."""
        train_cfg = cfg.copy()
        with open_dict(train_cfg):
            train_cfg.task_name = TrainRun.APP
            train_cfg.paths.output_dir = str(self.train.path)
            if not train_cfg.get("force") and not self.train.finished() and self.train.outputs():
                if self.train.last_checkpoint.is_file():
                    train_cfg.ckpt_path = "last"
                else:
                    train_cfg.force = True
        return train_cfg

    def resumes(self, cfg: DictConfig) -> bool:
        """A re-run with the config the pipeline was made with (up to what :attr:`RERUN_MAY_CHANGE`)
        continues it; another config is refused, naming the keys that differ."""
        saved = self.train if self.train.has_config() else self
        if not saved.has_config():
            return False
        differ = config_differences(
            OmegaConf.to_container(OmegaConf.load(saved.config_file)),  # as saved: no renames
            resolved_config(self.stage1_config(cfg), self.train.path),
            self.RERUN_MAY_CHANGE,
        )
        if differ:
            raise EENNError(
                f"pipeline dir {str(self.path)!r} was made with another config ({differ}): choose "
                "another pipeline.name, or add force=true to redo it all with this one."
            )
        return True

    @property
    def name(self) -> str:
        return self.path.name

    def finished(self) -> bool:
        return self.compare.finished()

    @property
    def train(self) -> TrainRun:
        return TrainRun(self.path / self.TRAIN)

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


#: the run dir of each app, by its config's task_name
RUN_TYPES: dict[str, type[RunDir]] = {
    t.APP: t for t in (TrainRun, FitRun, InferRun, ExportRun, CompareRun, PipelineRun)
}
