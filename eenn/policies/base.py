"""The one exit-policy interface that offline evaluation and the online engine share.

A policy is fitted once on validation predictions, then asked per exit about a batch::

    policy = build_policy("maxprob").fit(val, budget=2.5e6, cost_unit="flops")
    state = policy.init_state(n)                      # per-sample tensors, leading dim n
    d = policy.decide(k, logits_k, state)             # d.exit (B,), d.next_exit (B,), d.state

The engine keeps only the continuing samples (``~d.exit``) and index-selects every tensor of
``d.state`` with them: that is why all state is per-sample, with a leading batch dimension.
``decide`` is pure torch over the batch and never modifies its inputs, so offline simulation
(:func:`eenn.policies.simulate.simulate`, which calls it on exactly these compacted subsets)
and the engine cannot disagree.

A fitted policy saves as one small safetensors file: its fitted tensors, plus JSON metadata
(name, hyper-parameters, K, C, cost unit, budget); no pickle.

Any policy can be fitted on temperature-scaled logits (``fit(..., temperature=T)``, eenn-fit's
``calibrate=true``): ``decide`` then divides exit k's logits by T_k before the policy sees them,
and T is saved with the policy, so offline evaluation and the engine scale alike.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

from eenn.errors import EENNError, is_number
from eenn.predictions import Predictions
from eenn.registry import Registry
from eenn.utils.io import read_safetensors, write_safetensors

if TYPE_CHECKING:
    from typing_extensions import Self

FORMAT = "eenn.policy/1"
#: the policy file's tensor of per-exit temperatures (absent: the policy reads unscaled logits)
TEMPERATURE = "temperature"

State = dict[str, torch.Tensor]
P = TypeVar("P", bound="ExitPolicy")


class Decision:
    """What a policy decides at exit k for a batch of B samples.

    ``exit``: True where the sample answers with exit k's prediction. ``next_exit``: for the others,
    the index of the next exit whose head the sample evaluates (normally k + 1; DEEx jumps to K-1);
    for exiting samples it equals k. ``state``: the samples' updated per-sample state.

    A decision made by :func:`continue_to_next` is ``onward``: everyone who does not exit goes on
    to exit k + 1, and ``next_exit`` is built only when something reads it. The engine reads
    ``onward`` instead: at batch 1 every tensor op is a visible share of a decision's time.
    """

    __slots__ = ("exit", "state", "_next_exit", "_k")

    def __init__(self, exit: torch.Tensor, next_exit: torch.Tensor, state: State) -> None:
        self.exit, self.state = exit, state
        self._next_exit: torch.Tensor | None = next_exit
        self._k: int | None = None  # set for onward decisions: the exit they were made at

    @property
    def onward(self) -> bool:
        """Whether every sample that does not exit goes on to exit k + 1 (a :func:`continue_to_next` decision)."""
        return self._k is not None

    @property
    def next_exit(self) -> torch.Tensor:
        if self._next_exit is None:
            assert self._k is not None
            self._next_exit = torch.where(self.exit, *_exit_or_next(self._k, self.exit.device))
        return self._next_exit

    @next_exit.setter
    def next_exit(self, value: torch.Tensor) -> None:
        self._next_exit, self._k = value, None


POLICIES: Registry[ExitPolicy] = Registry("exit policy", "policy.name")


def register(name: str) -> Callable[[type[P]], type[P]]:
    """Class decorator: make the policy buildable by ``name``."""

    def deco(cls: type[P]) -> type[P]:
        cls.name = name
        return POLICIES.register(name)(cls)

    return deco


def build_policy(name: str, **cfg: Any) -> ExitPolicy:
    """Instantiate the policy registered as ``name`` with hyper-parameters ``cfg``; an unknown
    name or option is an EENNError that lists the valid ones."""
    cls = POLICIES.get(name)
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(cfg) - set(params))
    if unknown:
        raise EENNError(f"policy {name!r} does not take the option(s) {unknown}; it takes {params}.")
    return cls(**cfg)


def check_budget(budget: Any, key: str = "budget") -> float:
    """A budget must be a finite positive number (``key`` names it in the error)."""
    if not is_number(budget) or budget <= 0:
        raise EENNError(f"{key} must be a finite positive number, got {budget!r}.")
    return float(budget)


def policy_class(name: str) -> type[ExitPolicy]:
    """The class registered as ``name``; for a name this version does not register (results
    written by another version), the base class: an ordinary online policy fitted to budgets."""
    return POLICIES.get(name) if name in POLICIES else ExitPolicy  # type: ignore[return-value]


def budget_ceiling() -> str:
    """The registered policy whose accuracy no exit assignment beats at its budget: it reads the
    labels (offline only) and spends a budget (the oracle curve of the comparisons)."""
    (name,) = [n for n in POLICIES.names() if not policy_class(n).online and policy_class(n).budgeted]
    return name


class ExitPolicy:
    """Base class. Subclasses set ``_fit`` and ``_decide``; the base enforces the shared rules
    (everyone exits at the last exit, input shapes) and the save format.

    The class attributes say what a policy is, so that the apps (pipeline, plots, report,
    eenn-infer) and the contract tests ask them and never check a policy's name."""

    name: ClassVar[str] = ""
    #: False for policies that need labels (the oracles): they run on saved predictions only.
    online: ClassVar[bool] = True
    #: True where it can fit its decisions to a budget (when its config leaves them open).
    budgeted: ClassVar[bool] = True
    #: True where it answers at the one exit its ``exit`` hyper-parameter names (static): it is
    #: fitted and compared once per exit, not per budget.
    per_exit_only: ClassVar[bool] = False
    #: True where a decision threshold ``p_d`` (a hyper-parameter) trades edge for cloud (DEEx):
    #: eenn-infer draws the inference time over p_d, eenn-compare finds its crossing point.
    has_p_d_curve: ClassVar[bool] = False
    #: True where it certifies a risk against the final exit (Learn then Test): eenn-compare draws
    #: its risk-cost curves beside its ``uncertified()`` twin.
    risk_controlled: ClassVar[bool] = False
    #: True where a decision may send a sample past the next exit (DEEx offloads to the last): a
    #: deployment bundle then also holds the middle stages and heads apart, so that a head can be skipped.
    jumps: ClassVar[bool] = False
    #: Hyper-parameters to build it with in tests (each is ``build_policy(name, **example)``).
    examples: ClassVar[tuple[dict[str, Any], ...]] = ({},)

    #: fitted tensors where fitting writes +-inf on purpose (a threshold no score passes); any
    #: other inf in a policy file was put there by hand
    infinite_tensors: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.num_exits: int | None = None
        self.num_classes: int | None = None
        self.cost_unit: str | None = None
        self.budget: float | None = None
        self.info: dict[str, Any] = {}  # what fitting found (q, realised validation cost, ...)
        #: per-exit temperatures (K,) the logits are divided by before deciding; None: unscaled
        self.temperature: torch.Tensor | None = None
        self.device = torch.device("cpu")  # where its fitted tensors and new states live

    # ----------------------------------------------------------------- fitting
    def fit(
        self, val: Predictions, budget: float | None, cost_unit: str, temperature: torch.Tensor | None = None
    ) -> Self:
        """Fit on validation predictions for an average ``budget`` per sample (absolute, in
        ``cost_unit``; None where the policy's own config fixes its thresholds); with
        ``temperature`` (K,), on the logits divided by it, as the fitted policy will decide."""
        costs, heads = self._bind(val, cost_unit)
        self.budget = None if budget is None else check_budget(budget)
        self.info = {}
        if temperature is not None and (temperature.shape != (val.num_exits,) or not bool((temperature > 0).all())):
            raise EENNError(f"temperature must hold {val.num_exits} positive values, got {temperature.tolist()}.")
        if temperature is not None:
            temperature = temperature.to(torch.float32)
        # _fit sees the scaled logits and, while it simulates, decide must not scale them again
        self.temperature = None
        self._fit(val.scaled(temperature), costs, heads, self.budget)
        self.temperature = None if temperature is None else temperature.to(self.device)
        return self

    def cheapest_cost(self, val: Predictions, cost_unit: str) -> float:
        """The lowest average cost any budget can buy this policy on ``val``: budgets below it
        cannot be met."""
        return self._cheapest(val, *self._bind(val, cost_unit))

    def _bind(self, val: Predictions, cost_unit: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Take K, C and the cost unit from ``val``; return its costs and head costs in that unit."""
        val.validate("validation predictions")
        costs, heads = val.costs_in(cost_unit), val.head_costs_in(cost_unit)
        self.num_exits, self.num_classes, self.cost_unit = val.num_exits, val.num_classes, cost_unit
        return costs, heads

    def _fit(self, val: Predictions, costs: torch.Tensor, heads: torch.Tensor, budget: float | None) -> None:
        raise NotImplementedError

    def _cheapest(self, val: Predictions, costs: torch.Tensor, heads: torch.Tensor) -> float:
        return float(costs[0])  # everyone at exit 0

    def hparams(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable): what ``build_policy`` needs to rebuild it."""
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Fitted tensors to save."""
        return {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``tensors`` returned."""

    def check_fitted(self) -> None:
        """Raise a ValueError where the fitted state is not one ``fit`` makes (a policy file
        edited by hand): subclasses add their tensors' shapes and ranges."""
        for name, t in self.tensors().items():
            if t.is_floating_point() and torch.isnan(t).any():
                raise ValueError(f"its tensor {name!r} holds NaN")
            if t.is_floating_point() and name not in self.infinite_tensors and not bool(t.isfinite().all()):
                raise ValueError(f"its tensor {name!r} holds inf, which fitting never writes there")
        T = self.temperature
        if T is not None and (
            tuple(T.shape) != (self.num_exits,) or not bool((T > 0).all()) or not bool(T.isfinite().all())
        ):
            raise ValueError(f"its 'temperature' must be {self.num_exits} finite positive values")

    def to(self, device: str | torch.device) -> Self:
        """Move the fitted tensors to ``device`` (the engine's); new states are created there."""
        self.device = torch.device(device)
        self.load_tensors({k: v.to(self.device) for k, v in self.tensors().items()})
        if self.temperature is not None:
            self.temperature = self.temperature.to(self.device)
        return self

    # ---------------------------------------------------------------- deciding
    def init_state(self, n: int) -> State:
        """Per-sample state for n samples entering exit 0 (every tensor has leading dim n)."""
        return {}

    def offline_state(self, logits: torch.Tensor, labels: torch.Tensor | None) -> State:
        """The state offline simulation starts from; policies that peek at labels override this."""
        return self.init_state(logits.shape[0])

    def decide(self, k: int, logits_k: torch.Tensor, state: State) -> Decision:
        """Decide at exit ``k`` for a batch of logits (B, C) and the samples' state."""
        K = self._require_fitted()
        if not 0 <= k < K:
            raise ValueError(f"exit index {k} out of range for a policy fitted on {K} exits")
        if logits_k.ndim != 2 or logits_k.shape[1] != self.num_classes:
            raise ValueError(f"logits at exit {k} must have shape (B, {self.num_classes}), got {tuple(logits_k.shape)}")
        if self.temperature is not None:
            logits_k = logits_k / self.temperature[k]
        d = self._decide(k, logits_k, state)
        if k == K - 1:  # the last exit always answers
            return continue_to_next(k, torch.ones_like(d.exit), d.state)
        if not d.onward:
            d.next_exit = d.next_exit.masked_fill(d.exit, k)
        return d

    def _decide(self, k: int, logits_k: torch.Tensor, state: State) -> Decision:
        raise NotImplementedError

    def _require_fitted(self) -> int:
        if self.num_exits is None:
            raise RuntimeError(f"policy {self.name!r} is not fitted: call fit() or load() first")
        return self.num_exits

    # ------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted policy as a safetensors file with JSON metadata."""
        self._require_fitted()
        meta = {
            "format": FORMAT,
            "name": self.name,
            "hparams": json.dumps(self.hparams()),
            "fitted": json.dumps(
                {
                    "num_exits": self.num_exits,
                    "num_classes": self.num_classes,
                    "cost_unit": self.cost_unit,
                    "budget": self.budget,
                    "info": self.info,
                }
            ),
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
        if self.temperature is not None:
            tensors[TEMPERATURE] = self.temperature.detach().cpu().contiguous()
        return write_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExitPolicy:
        """Read a policy file written by :meth:`save` (whatever its subclass)."""
        tensors, meta = read_safetensors(path, "policy file")
        try:
            hparams = json.loads(meta.get("hparams", "{}"))
            fitted = json.loads(meta.get("fitted", "{}"))
        except ValueError as exc:
            raise EENNError(f"policy file {str(path)!r} has unreadable metadata: {str(exc).rstrip('.')}.") from None
        if meta.get("format") != FORMAT:
            raise EENNError(f"policy file {str(path)!r} has format {meta.get('format')!r}, expected {FORMAT!r}.")
        try:
            policy = build_policy(meta.get("name", ""), **hparams)
        except EENNError as exc:  # what eenn-fit refuses in a config, it refuses in a file
            raise EENNError(f"policy file {str(path)!r}: {exc}") from None
        K, C = fitted.get("num_exits"), fitted.get("num_classes")
        if not (is_number(K, integer=True) and K >= 1 and is_number(C, integer=True) and C >= 2):
            raise EENNError(f"policy file {str(path)!r} says it was fitted on {K!r} exits and {C!r} classes.")
        policy.num_exits, policy.num_classes = K, C
        policy.cost_unit, policy.budget = fitted.get("cost_unit"), fitted.get("budget")
        policy.info = fitted.get("info", {})
        try:
            policy.temperature = tensors.pop(TEMPERATURE, None)
            policy.load_tensors(tensors)
            policy.check_fitted()
        except KeyError as exc:
            raise EENNError(
                f"policy file {str(path)!r} lacks the tensor {exc} of a fitted {policy.name!r} policy."
            ) from None
        except (ValueError, RuntimeError, IndexError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[0].rstrip(":.")
            raise EENNError(f"policy file {str(path)!r} is not a fitted {policy.name!r} policy: {reason}.") from None
        return policy


#: exit k's (k, k + 1) as 0-d tensors on each device, made once: ``torch.where`` wraps Python
#: numbers into new tensors at every call (on the condition's device: CUDA's ``where`` has refused
#: CPU tensors, even 0-d ones)
_EXIT_OR_NEXT: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _exit_or_next(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pair = _EXIT_OR_NEXT.get((k, device))
    if pair is None:
        with torch.inference_mode(False):  # ordinary tensors, usable by tracing and autograd alike
            pair = _EXIT_OR_NEXT[(k, device)] = (torch.tensor(k, device=device), torch.tensor(k + 1, device=device))
    return pair


def continue_to_next(k: int, exit_now: torch.Tensor, state: State) -> Decision:
    """The usual decision: exit where ``exit_now``, everyone else goes on to exit k + 1 (an
    ``onward`` decision: no op builds ``next_exit`` unless something reads it)."""
    d = Decision.__new__(Decision)  # skips __init__: an onward decision has no next_exit until read
    d.exit, d.state, d._next_exit, d._k = exit_now, state, None, k
    return d
