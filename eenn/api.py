"""The Python API: a trained multi-exit model and its exit policy, for notebooks and scripts.

It sits on the objects the apps use (:class:`~eenn.rundir.TrainRun`, :class:`~eenn.policies.base.ExitPolicy`,
:class:`~eenn.inference.engine.EarlyExitEngine`, :func:`~eenn.policies.base.build_policy`), with no
second implementation of any of them::

    import eenn
    model = eenn.load("outputs/train/runs/<run>", policy="outputs/fit/runs/<fit>")
    out = model.predict(x)            # classes, exits, logits, per-sample cost: the real engine
    model.anytime(x)                  # every exit's logits (N, K, C)
    policy = eenn.fit_policy("outputs/train/runs/<run>", "maxprob", budget=0.6)
    model.with_policy(policy).save_pretrained("my-model")   # a self-contained model dir
    eenn.EarlyExitModel.from_pretrained("my-model")          # no run dir, no Hydra

A model dir (:meth:`EarlyExitModel.save_pretrained`) holds ``config.json`` (the composed model
config: backbone, exits, input form, classes, normalisation, and the training config),
``model.safetensors``, ``costs.json``, ``policies/<name>.safetensors``, ``metrics.json`` and a
``README.md`` model card (:mod:`eenn.card`): the layout of Hugging Face's ``ModelHubMixin``, so a
model dir pushed to the Hub loads back by its repo id. Loading one imports neither Hydra nor
Lightning, so this module imports :mod:`eenn.rundir` and the apps' modules only where a function
reads a run dir.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eenn import hub
from eenn.cost import CostProfile
from eenn.errors import EENNError
from eenn.inference.engine import EarlyExitEngine, batches_of
from eenn.models.multi_exit import MultiExitNetwork, build_multi_exit
from eenn.policies.base import ExitPolicy, build_policy
from eenn.predictions import Predictions
from eenn.utils.io import atomic_path, read_json, write_json

__all__ = ["EarlyExitModel", "Output", "evaluate", "fit_policy", "from_pretrained", "load", "load_split"]

FORMAT = "eenn.pretrained/1"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
COSTS = "costs.json"
METRICS = "metrics.json"
CARD = "README.md"
POLICIES = "policies"
#: backbone keys that fetch or read weights when the network is built: a model dir has its own
WEIGHT_SOURCES = {"pretrained": False, "checkpoint": None}
#: the stage-1 config keys a model dir keeps as its training config (the rest say where it ran)
TRAINING_KEYS = ("data", "backbone", "exits", "training", "trainer", "seed")
#: (group, key) of the training config that name a path on the machine it ran on, not what it trained
LOCAL_PATHS = (("data", "root"), ("trainer", "default_root_dir"))

PolicyLike = ExitPolicy | str | os.PathLike


@dataclass
class Output:
    """What :meth:`EarlyExitModel.predict` returns, per sample in input order."""

    classes: torch.Tensor  # (N,) int64: the predicted class
    exits: torch.Tensor  # (N,) int64: the exit that answered
    logits: torch.Tensor  # (N, C) float32: that exit's logits
    cost: torch.Tensor  # (N,) float64: what the sample paid (stages to its exit + the heads it ran), in ``unit``
    unit: str
    heads: torch.Tensor  # (N, K) bool: the exit heads it evaluated

    def accuracy(self, labels: torch.Tensor) -> float:
        return float((self.classes == labels.to(self.classes.device)).double().mean())


class EarlyExitModel:
    """A trained multi-exit network, its cost profile and (optionally) a fitted exit policy.

    Build one with :func:`load` (a stage-1 run dir) or :meth:`from_pretrained` (a model dir or a
    Hub repo id). Inputs are tensors in the form the training data took: normalised float
    (N, C, H, W); :meth:`normalise` turns raw images into that form."""

    def __init__(
        self,
        network: MultiExitNetwork,
        costs: CostProfile,
        config: dict[str, Any],
        policy: ExitPolicy | None = None,
        device: str | torch.device = "cpu",
        policies: Mapping[str, ExitPolicy] | None = None,
        card_metrics: dict[str, Any] | None = None,
        run_dir: Path | None = None,
    ) -> None:
        self.device = _device(device)
        self.network = network.to(self.device).eval()
        self.cost_profile = costs
        self.config = config
        #: fitted policies saved with the model (by name); ``with_policy(name)`` picks one
        self.policies = dict(policies or {})
        self.policy = None if policy is None else self._check_policy(policy, "policy")
        self.card_metrics = card_metrics  # a model dir's card numbers, kept for saving it again
        self.run_dir = run_dir  # the stage-1 run it was loaded from (None: a model dir)

    def __repr__(self) -> str:
        policy = self.policy.name if self.policy is not None else None
        return (
            f"EarlyExitModel({self.config['backbone'].get('name')}, exits={self.exit_names}, "
            f"classes={len(self.class_names)}, policy={policy!r}, device={str(self.device)!r})"
        )

    # ------------------------------------------------------------------ what it is
    @property
    def exit_names(self) -> list[str]:
        return list(self.network.exit_names)

    @property
    def num_exits(self) -> int:
        return self.network.num_exits

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.config["input_shape"])

    @property
    def costs(self) -> dict[str, list[float]]:
        """Per exit, what a sample pays to answer there (the stages up to it and every head up to
        it), in each unit the profile holds: ``flops``, ``macs``, ``params`` and, where measured
        in training, ``latency_ms``."""
        units = [u for u in self.cost_profile.units if getattr(self.cost_profile.exits[0], u, None) is not None]
        return {u: self.cost_profile.per_exit(u) for u in units}

    # ------------------------------------------------------------------ inputs
    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images, uint8 (N, C, H, W) or (N, H, W) in 0..255, or float in [0, 1], normalised as
        the training data were (its per-channel mean and std)."""
        from eenn.data.augment import BatchAugment  # the data module's own conversion

        norm = self.config.get("normalisation")
        if not norm:
            raise EENNError(
                "this model records no input normalisation (config.json's 'normalisation'); "
                "pass normalised inputs to predict()."
            )
        x = images if images.ndim == 4 else images.unsqueeze(1)
        if x.dtype != torch.uint8:
            x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return BatchAugment(norm["mean"], norm["std"])(x).contiguous()

    def _input(self, x: Any) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.ndim != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            raise EENNError(
                f"inputs must have shape (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}; "
                "raw images go through model.normalise() first."
            )
        if not x.is_floating_point():
            raise EENNError(
                f"inputs must be normalised float tensors, got {x.dtype}; raw images go through "
                "model.normalise() first."
            )
        return x.float()

    # ------------------------------------------------------------------ predicting
    def predict(self, x: torch.Tensor, batch_size: int = 256, unit: str | None = None) -> Output:
        """Early-exit prediction with the model's policy on the engine that really skips layers:
        each batch runs stage by stage and a sample leaves at the first exit the policy lets it.
        ``unit``: the cost unit of ``Output.cost`` (default: the policy's)."""
        if self.policy is None:
            raise EENNError(
                "this model has no exit policy: pass policy= to eenn.load, use model.with_policy(...), "
                "or model.anytime(x) for every exit's logits."
            )
        x = self._input(x)
        unit = unit or self.policy.cost_unit or "flops"
        if unit not in self.costs:
            raise EENNError(f"unit={unit!r}: this model's cost profile holds {sorted(self.costs)}.")
        engine = EarlyExitEngine(self.network, self.policy, device=self.device)
        result = engine.run(batches_of(x, batch_size))
        return Output(
            result.predictions,
            result.exit_index,
            result.logits,
            result.cost(self.cost_profile, unit),
            unit,
            result.heads_evaluated,
        )

    @torch.inference_mode()
    def anytime(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Every exit's logits (N, K, C), on the CPU: anytime prediction, no policy needed."""
        x = self._input(x)
        return torch.cat([self.network(b.to(self.device)).float().cpu() for b in batches_of(x, batch_size)])

    # ------------------------------------------------------------------ policies
    def with_policy(self, policy: PolicyLike) -> EarlyExitModel:
        """The same network (shared, not copied) with another fitted policy: an ExitPolicy, a
        policy file, an eenn-fit run dir, or the name of a policy saved with the model."""
        return EarlyExitModel(
            self.network,
            self.cost_profile,
            self.config,
            self._check_policy(policy, "policy"),
            self.device,
            self.policies,
            self.card_metrics,
            self.run_dir,
        )

    def _check_policy(self, policy: PolicyLike, key: str) -> ExitPolicy:
        if not isinstance(policy, ExitPolicy):
            name = str(policy)
            policy = self.policies[name] if name in self.policies else read_policy(policy, key)
        if policy.num_exits is None:
            raise EENNError(f"{key}: policy {policy.name!r} is not fitted; fit it first (eenn.fit_policy).")
        if (policy.num_exits, policy.num_classes) != (self.num_exits, len(self.class_names)):
            raise EENNError(
                f"{key}: policy {policy.name!r} was fitted on {policy.num_exits} exits and {policy.num_classes} "
                f"classes, but this model has {self.num_exits} and {len(self.class_names)}."
            )
        if not policy.online:
            raise EENNError(
                f"{key}: policy {policy.name!r} reads the labels (an oracle), so it cannot run on new inputs."
            )
        return policy

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        policies: Mapping[str, PolicyLike] | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **hub_kwargs: Any,
    ) -> Path:
        """Write a self-contained model dir: config.json, model.safetensors, costs.json, the
        model's policy and ``policies`` (by name) under policies/, metrics.json and a README.md
        model card. The dir is written beside its destination and renamed into place, so a
        failure leaves nothing half-written; an existing non-empty dir is refused. With
        ``push_to_hub``, also upload it to ``repo_id`` (see :meth:`push_to_hub`)."""
        from safetensors.torch import save_model

        from eenn.card import model_card

        if push_to_hub and not repo_id:
            raise EENNError("save_pretrained(push_to_hub=True) needs repo_id='<user>/<repo>'.")
        out = Path(save_directory)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise EENNError(f"save_directory {str(out)!r} exists and is not an empty directory; choose a new one.")
        named = {**self.policies, **{n: self._check_policy(p, f"policies[{n!r}]") for n, p in (policies or {}).items()}}
        if self.policy is not None:
            named.setdefault(self.policy.name, self.policy)
        metrics = self._card_metrics(named)
        config = {
            **self.config,
            "format": FORMAT,
            "eenn_version": _version(),
            "policy": self.policy.name if self.policy is not None else None,
            "policies": sorted(named),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a model dir is for sharing
            write_json(tmp / CONFIG, config)
            with atomic_path(tmp / WEIGHTS) as weights:
                save_model(self.network, str(weights), metadata={"format": FORMAT})
            write_json(tmp / COSTS, self.cost_profile.to_dict())
            for name, p in named.items():
                p.save(tmp / POLICIES / f"{name}.safetensors")
            write_json(tmp / METRICS, metrics)
            with atomic_path(tmp / CARD) as card:
                card.write_text(model_card(config, metrics))
            if out.is_dir():
                out.rmdir()  # empty (checked above)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if push_to_hub:
            hub.push(out, repo_id, **hub_kwargs)
        return out

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload eenn model",
    ) -> str:
        """Save the model dir and upload it as Hugging Face Hub model repo ``repo_id`` (created if
        missing); returns the commit's URL. Needs network and huggingface_hub (``eenn[hub]``)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = self.save_pretrained(Path(tmp) / "model")
            return hub.push(path, repo_id, private=private, token=token, commit_message=commit_message)

    def _card_metrics(self, policies: Mapping[str, ExitPolicy]) -> dict[str, Any]:
        """The model card's numbers: from the run dir; for a model loaded from a model dir, its saved
        ones, a policy added since listed without accuracy (there are no predictions to score it on)."""
        from eenn.card import card_metrics, unscored

        if self.run_dir is not None:
            return card_metrics(_stage1(self.run_dir), policies, fit=fit_policy, score=evaluate)
        if self.card_metrics is None:
            raise EENNError(
                "this model came from neither a run dir nor a model dir, so it has no metrics for its model card."
            )
        known = {p["name"] for p in self.card_metrics["policies"]}
        added = [unscored(name, p) for name, p in sorted(policies.items()) if name not in known]
        return {**self.card_metrics, "policies": [*self.card_metrics["policies"], *added]}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model_id: str | os.PathLike,
        policy: str | PolicyLike | None = "default",
        device: str | torch.device = "cpu",
        revision: str | None = None,
        token: str | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> EarlyExitModel:
        """A model dir written by :meth:`save_pretrained`, or a Hub repo id (``<user>/<repo>``,
        downloaded into the Hub's cache; offline, only a cached one). ``policy``: ``"default"``
        (the policy it was saved with, if any), the name of one saved with it, a policy file or
        fit dir, or None. Needs neither a run dir nor Hydra."""
        path = Path(model_id)
        if not path.is_dir():
            path = hub.download(str(model_id), revision, token, cache_dir)
        config = read_json(path / CONFIG, "model config")
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            got = config.get("format") if isinstance(config, dict) else type(config).__name__
            raise EENNError(f"model config {str(path / CONFIG)!r} has format {got!r}, expected {FORMAT!r}.")
        network = build_network(config)
        load_network_weights(network, path / WEIGHTS)
        costs = CostProfile.from_dict(read_json(path / COSTS, "cost profile"))
        policies = {n: ExitPolicy.load(path / POLICIES / f"{n}.safetensors") for n in config.get("policies", [])}
        metrics = read_json(path / METRICS, "model metrics") if (path / METRICS).is_file() else None
        model = cls(network, costs, _model_config(config), None, device, policies, metrics)
        if policy == "default":
            policy = config.get("policy")
        return model if policy is None else model.with_policy(policy)


# ---------------------------------------------------------------------------- functions
def load(
    run_dir: str | os.PathLike,
    policy: PolicyLike | None = None,
    device: str | torch.device = "cpu",
    checkpoint: str = "best",
) -> EarlyExitModel:
    """A stage-1 run's model (an eenn-train run dir, or an eenn-pipeline dir: its ``train/``) with
    its ``checkpoint`` (best, last or a path), ready on ``device``; ``policy`` (optional): an
    eenn-fit run dir, a policy file or a fitted ExitPolicy."""
    from eenn.tasks.build import datamodule, load_network  # Hydra: only a run dir needs it, never a model dir

    run = _stage1(run_dir)
    dm = datamodule(run)
    dm.setup("test")  # the normalisation comes from the training split
    network = load_network(run, checkpoint, dm)
    cfg = run.config()
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    mean, std = dm.normalisation
    config = {
        "backbone": {**resolved["backbone"], **{k: v for k, v in WEIGHT_SOURCES.items() if k in resolved["backbone"]}},
        "exits": resolved["exits"],
        "num_classes": dm.num_classes,
        "input_shape": list(dm.input_shape),
        "class_names": dm.class_names,
        "exit_names": network.exit_names,
        "normalisation": {"mean": list(mean), "std": list(std)},
        "train_config": _training_config(resolved),
        "source": {
            "run_dir": str(run.path.resolve()),
            "checkpoint": str(run.checkpoint(checkpoint).resolve()),
            "code": run.metrics().get("code") if run.finished() else None,
        },
    }
    model = EarlyExitModel(network, run.costs(), config, None, device, run_dir=run.path)
    return model if policy is None else model.with_policy(policy)


def from_pretrained(model_id: str | os.PathLike, **kwargs: Any) -> EarlyExitModel:
    """:meth:`EarlyExitModel.from_pretrained`: a model dir or a Hub repo id."""
    return EarlyExitModel.from_pretrained(model_id, **kwargs)


def load_split(run_dir: str | os.PathLike, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """A stage-1 run's ``val`` or ``test`` split as the network takes it: (normalised inputs, labels),
    in the order of its saved predictions."""
    from eenn.predictions import SPLITS
    from eenn.tasks.infer import load_split as whole_split

    if split not in SPLITS:
        raise EENNError(f"split must be one of {SPLITS}, got {split!r}.")
    from eenn.tasks.build import datamodule

    dm = datamodule(_stage1(run_dir))
    dm.setup("test")
    return whole_split(dm, split)


def fit_policy(
    source: Predictions | str | os.PathLike | EarlyExitModel,
    policy: str = "maxprob",
    budget: float | None = 0.5,
    *,
    budget_value: float | None = None,
    cost: str | None = None,
    calibrate: bool = False,
    **hparams: Any,
) -> ExitPolicy:
    """Fit exit policy ``policy`` (a registered name: maxprob, entropy, patience, eenet, ...; its
    options as keywords) on validation predictions, as eenn-fit does: ``source`` is validation
    Predictions, a predictions file, a stage-1 run dir (its ``predictions/val.safetensors``), or a
    model loaded from one. ``budget``: the average cost per sample as a fraction of the full
    model's, or ``budget_value`` in the cost unit ``cost`` (default: the predictions'); out of
    what the policy can spend it is clamped with a warning, as eenn-fit clamps it. ``budget=None``
    for a policy whose options fix its decisions."""
    from omegaconf import OmegaConf

    from eenn.tasks.fit import calibrate_and_fit, cost_unit, requested_fraction, resolve_budget

    val = _val_predictions(source)
    p = build_policy(policy, **hparams)
    # eenn-fit's defaults: a risk-controlled policy gets its temperatures from a split of validation
    cfg = OmegaConf.create(
        {
            "cost": cost,
            "budget": {"fraction": budget, "value": budget_value, "point": None},
            "calibrate": calibrate,
            "calibrate_split": 0.2,
            "calibrate_seed": 0,
        }
    )
    unit = cost_unit(cfg, val)
    amount = None
    if budget is not None or budget_value is not None:
        amount, _ = resolve_budget(cfg, p, val, unit, requested_fraction(cfg, val.costs_in(unit)))
    calibrate_and_fit(cfg, p, val, amount, unit)
    return p


def evaluate(
    policy: ExitPolicy, source: Predictions | str | os.PathLike, split: str = "test", unit: str | None = None
) -> dict[str, Any]:
    """A fitted policy simulated offline on saved predictions (a Predictions object, a predictions
    file or a stage-1 run dir's ``split``), as eenn-fit's metrics report it: accuracy,
    avg_cost, avg_cost_fraction, exit_fractions, exit_accuracy, confusion, risk."""
    from eenn.evaluation.offline import evaluate as simulate

    preds = _predictions(source, split)
    return simulate(policy, preds, unit or policy.cost_unit or preds.cost_unit)


# ---------------------------------------------------------------------------- helpers
def build_network(config: Mapping[str, Any]) -> MultiExitNetwork:
    """The (untrained) network a model dir's config describes."""
    missing = [k for k in ("backbone", "exits", "num_classes", "input_shape") if k not in config]
    if missing:
        raise EENNError(f"model config lacks {missing}: it is not an eenn model dir's config.json.")
    return build_multi_exit(
        dict(config["backbone"]), dict(config["exits"]), int(config["num_classes"]), list(config["input_shape"])
    )


def load_network_weights(network: MultiExitNetwork, path: Path) -> None:
    """A model dir's weights into ``network``; a file that is not this network's is one sentence."""
    from safetensors.torch import load_model

    from eenn.utils.io import read_safetensors

    read_safetensors(path, "model weights")  # a missing or corrupt file, named
    try:
        load_model(network, str(path), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0].rstrip(":.")
        raise EENNError(
            f"model weights {str(path)!r} do not fit the network config.json describes ({first})."
        ) from None


def read_policy(policy: str | os.PathLike, key: str = "policy") -> ExitPolicy:
    """A policy file, or an eenn-fit run dir's policy."""
    path = Path(policy)
    if path.is_dir():
        from eenn.rundir import FitRun

        fit = FitRun(path)
        if not fit.policy_file.is_file():
            raise EENNError(f"{key}={str(path)!r} holds no {fit.policy_file.name}: it is not an eenn-fit run dir.")
        return fit.policy()
    if not path.is_file():
        raise EENNError(
            f"{key}={str(policy)!r} is neither a policy file, an eenn-fit run dir nor a policy saved with the model."
        )
    return ExitPolicy.load(path)


def _stage1(run_dir: str | os.PathLike) -> Any:
    from eenn.rundir import PipelineRun, RunDir, TrainRun

    path = Path(run_dir)
    if not path.is_dir():
        raise EENNError(f"run_dir={str(path)!r} is not a directory.")
    if RunDir(path).saved_app() == PipelineRun.APP:
        return PipelineRun(path).train
    run = TrainRun(path)
    if run.saved_app() != TrainRun.APP:
        raise EENNError(f"run_dir={str(path)!r} is not an eenn-train (or eenn-pipeline) run dir.")
    return run


def _predictions(source: Predictions | str | os.PathLike | EarlyExitModel, split: str) -> Predictions:
    if isinstance(source, Predictions):
        return source
    if isinstance(source, EarlyExitModel):
        if source.run_dir is None:
            raise EENNError(
                "this model came from a model dir, which holds no predictions; pass its run dir or a predictions file."
            )
        source = source.run_dir
    path = Path(source)
    if path.is_file():
        return Predictions.load(path)
    return _stage1(path).predictions(split)


def _val_predictions(source: Predictions | str | os.PathLike | EarlyExitModel) -> Predictions:
    val = _predictions(source, "val")
    if val.split == "test":
        raise EENNError(
            "fit_policy: these are test predictions; a policy is fitted on validation predictions "
            "(the run's predictions/val.safetensors) and only evaluated on test."
        )
    return val


def _training_config(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """What the run trained (:data:`TRAINING_KEYS`), without the paths of the machine it ran on."""
    out = {k: resolved[k] for k in TRAINING_KEYS if k in resolved}
    for group, key in LOCAL_PATHS:
        if isinstance(out.get(group), dict):
            out[group] = {k: v for k, v in out[group].items() if k != key}
    return out


def _model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A model dir's config.json less what save_pretrained adds."""
    return {k: v for k, v in config.items() if k not in ("format", "eenn_version", "policy", "policies")}


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EENNError(f"device={device!r} is not a torch device (cpu, cuda, cuda:1, ...).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EENNError(f"device={str(device)!r} but CUDA is not available here; use device='cpu'.")
    return dev


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _version() -> str:
    from eenn import __version__

    return __version__
