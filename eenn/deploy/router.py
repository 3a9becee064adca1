"""The exit policies' decisions in numpy, for a runtime without PyTorch.

Each router is the numpy twin of one registered online policy (:mod:`eenn.policies`): the same
scores, in float32 as the torch features compute them, the same thresholds and state, and the
same shared rules as :meth:`eenn.policies.base.ExitPolicy.decide` (logits divided by the exit's
temperature first; the last exit always answers; an exiting sample's next exit is its own).
``tests/deploy/test_router.py`` walks every online policy in the registry through random
batches and checks that its router takes the same decision for every sample; a policy without a
router fails that test, and so cannot ship without one.

A router is built from what :meth:`Router.export` took from a fitted policy: JSON parameters and
named arrays (the policy files of a bundle, :mod:`eenn.deploy.bundle`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

State = dict[str, np.ndarray]


@dataclass
class Decision:
    """As :class:`eenn.policies.base.Decision`: ``exit`` (B,) bool, ``next_exit`` (B,) int64 and
    the samples' new state."""

    exit: np.ndarray
    next_exit: np.ndarray
    state: State


ROUTERS: dict[str, type[Router]] = {}


def router_for(*names: str) -> Any:
    """Class decorator: the router of the policies registered as ``names``."""

    def deco(cls: type[Router]) -> type[Router]:
        for name in names:
            ROUTERS[name] = cls
        return cls

    return deco


def _numpy(t: Any) -> np.ndarray:
    """A torch tensor (or anything array-like) as a numpy array, without importing torch."""
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


class Router:
    """Base: the shared rules of ``ExitPolicy.decide``. Subclasses set ``_decide`` and say what
    they read from a fitted policy (``params_of`` / ``arrays_of``)."""

    #: whether it may send a sample past the next exit (DEEx): the bundle then also holds each
    #: middle stage and head as graphs of their own, so that samples can skip a head
    jumps: ClassVar[bool] = False

    def __init__(self, name: str, num_exits: int, num_classes: int, params: dict[str, Any],
                 arrays: dict[str, np.ndarray]) -> None:
        self.name, self.num_exits, self.num_classes = name, num_exits, num_classes
        self.params = params
        # float32, as the torch policies hold their fitted tensors (cast once, not per decision)
        self.arrays = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in arrays.items()}
        self.temperature = self.arrays.get("temperature")

    # ---------------------------------------------------------------- export
    @classmethod
    def export(cls, policy: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What a fitted torch policy decides with: JSON parameters and arrays."""
        arrays = {k: _numpy(v) for k, v in cls.arrays_of(policy).items()}
        if policy.temperature is not None:
            arrays["temperature"] = _numpy(policy.temperature).astype(np.float32)
        return cls.params_of(policy), arrays

    @classmethod
    def params_of(cls, policy: Any) -> dict[str, Any]:
        return {}

    @classmethod
    def arrays_of(cls, policy: Any) -> dict[str, Any]:
        return {}

    def check(self) -> None:
        """Raise a ValueError naming what is wrong with the loaded parameters."""
        K = self.num_exits
        T = self.temperature
        if T is not None and (T.shape != (K,) or not np.all(np.isfinite(T)) or not np.all(T > 0)):
            raise ValueError(f"'temperature' must be {K} finite positive values")

    # -------------------------------------------------------------- deciding
    def init_state(self, n: int) -> State:
        return {}

    def decide(self, k: int, logits: np.ndarray, state: State) -> Decision:
        """Decide at exit ``k`` for logits (B, C) float32 and the samples' state."""
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        if self.temperature is not None:
            logits = logits / self.temperature[k]
        d = self._decide(k, logits, state)
        if k == self.num_exits - 1:  # everyone answers: only the state moves on
            return Decision(np.ones(len(logits), dtype=bool), np.full(len(logits), k, dtype=np.int64), d.state)
        d.next_exit[d.exit] = k  # a fresh array of _decide's
        return d

    def _decide(self, k: int, logits: np.ndarray, state: State) -> Decision:
        raise NotImplementedError


def continue_to_next(k: int, exit_now: np.ndarray, state: State) -> Decision:
    return Decision(exit_now, np.full(exit_now.shape, k + 1, dtype=np.int64), state)


# ------------------------------------------------------------------ features
# The float32 twins of eenn.policies.features, written to follow torch's order of operations.


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(-1, keepdims=True))
    return z * (np.float32(1.0) / z.sum(-1, keepdims=True))


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def max_prob(x: np.ndarray) -> np.ndarray:
    # the largest probability is exp(0) / sum = 1 / sum, as softmax's max element rounds too
    return np.float32(1.0) / np.exp(x - x.max(-1, keepdims=True)).sum(-1)


def entropy_score(x: np.ndarray) -> np.ndarray:
    logp = log_softmax(x)
    h = -(np.exp(logp) * logp).sum(-1)
    return np.float32(1.0) - h / np.float32(math.log(x.shape[-1]))


def neg_log_max_prob_score(x: np.ndarray) -> np.ndarray:
    return np.float32(1.0) - (-log_softmax(x).max(-1)) / np.float32(math.log(x.shape[-1]))


def margin(x: np.ndarray) -> np.ndarray:
    top2 = np.partition(softmax(x), -2, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def vote(preds: np.ndarray) -> np.ndarray:
    agree = (preds[:, :, None] == preds[:, None, :]).sum(-1)
    return agree.max(-1).astype(np.float32) / np.float32(preds.shape[1])


# ------------------------------------------------------------------- routers


class ThresholdRouter(Router):
    """Exit at the first exit whose score reaches its threshold (:mod:`eenn.policies.threshold`)."""

    @classmethod
    def arrays_of(cls, policy: Any) -> dict[str, Any]:
        return {"thresholds": policy.thresholds}

    def check(self) -> None:
        super().check()
        t = self.arrays["thresholds"]
        if t.shape != (self.num_exits,) or np.isnan(t).any():
            raise ValueError(f"'thresholds' must be {self.num_exits} numbers, got shape {t.shape}")

    def score(self, k: int, logits: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        raise NotImplementedError

    def _decide(self, k: int, logits: np.ndarray, state: State) -> Decision:
        s, state = self.score(k, logits, state)
        return continue_to_next(k, s >= self.arrays["thresholds"][k], state)


@router_for("maxprob", "risk")
class MaxProbRouter(ThresholdRouter):
    def score(self, k: int, logits: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        return max_prob(logits), state


@router_for("margin")
class MarginRouter(ThresholdRouter):
    def score(self, k: int, logits: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        return margin(logits), state


@router_for("entropy")
class EntropyRouter(ThresholdRouter):
    CRITERIA: ClassVar[dict[str, Any]] = {"entropy": entropy_score, "cross_entropy": neg_log_max_prob_score}

    @classmethod
    def params_of(cls, policy: Any) -> dict[str, Any]:
        return {"criterion": policy.criterion}

    def check(self) -> None:
        super().check()
        if self.params.get("criterion") not in self.CRITERIA:
            raise ValueError(f"'criterion' must be one of {sorted(self.CRITERIA)}, got {self.params.get('criterion')!r}")

    def score(self, k: int, logits: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        return self.CRITERIA[self.params["criterion"]](logits), state


@router_for("vote")
class VoteRouter(ThresholdRouter):
    def init_state(self, n: int) -> State:
        return {"preds": np.full((n, self.num_exits), -1, dtype=np.int64)}

    def score(self, k: int, logits: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        preds = state["preds"].copy()
        preds[:, k] = logits.argmax(-1)
        return vote(preds[:, : k + 1]), {"preds": preds}


@router_for("eenet")
class EENetRouter(ThresholdRouter):
    """EENet's g_k (:mod:`eenn.policies.eenet`): a linear score of [softmax, max prob, entropy
    score, vote, the earlier exits' clamped scores], thresholded before the clamp."""

    @classmethod
    def arrays_of(cls, policy: Any) -> dict[str, Any]:
        g = policy.scheduler.g
        return {"thresholds": policy.thresholds, **{f"g.{k}.weight": m.weight[0] for k, m in enumerate(g)},
                **{f"g.{k}.bias": m.bias for k, m in enumerate(g)}}

    def check(self) -> None:
        super().check()
        C = self.num_classes
        for k in range(self.num_exits):
            w, b = self.arrays[f"g.{k}.weight"], self.arrays[f"g.{k}.bias"]
            if w.shape != (C + 3 + k,) or b.shape != (1,):
                raise ValueError(f"'g.{k}.weight' must have shape ({C + 3 + k},) and 'g.{k}.bias' (1,)")

    def init_state(self, n: int) -> State:
        K = self.num_exits
        return {"preds": np.full((n, K), -1, dtype=np.int64), "scores": np.zeros((n, K), dtype=np.float32)}

    def score(self, k: int, logits: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        # the features of eenn.policies.eenet.exit_inputs, sharing the softmax's intermediates, and
        # g_k's product-sum taken piece by piece rather than over their concatenation (fewer copies
        # per decision: at batch 1 the router's time is all overhead)
        preds, scores = state["preds"].copy(), state["scores"].copy()
        preds[:, k] = logits.argmax(-1)
        C = self.num_classes
        z = logits - logits.max(-1, keepdims=True)
        e = np.exp(z)
        total = e.sum(-1, keepdims=True)
        p = e * (np.float32(1.0) / total)
        logp = z - np.log(total)
        ent = np.float32(1.0) - (-(np.exp(logp) * logp).sum(-1)) / np.float32(math.log(C))
        v = vote(preds[:, : k + 1]) if k else np.ones(len(logits), dtype=np.float32)
        w, b = self.arrays[f"g.{k}.weight"], self.arrays[f"g.{k}.bias"]
        raw = p @ w[:C] + p.max(-1) * w[C] + ent * w[C + 1] + v * w[C + 2] + scores[:, :k] @ w[C + 3:] + b[0]
        scores[:, k] = np.clip(raw, 0.0, 1.0)
        return raw, {"preds": preds, "scores": scores}


@router_for("patience")
class PatienceRouter(Router):
    @classmethod
    def params_of(cls, policy: Any) -> dict[str, Any]:
        return {"patience": int(policy.fitted_patience)}

    def check(self) -> None:
        super().check()
        p = self.params.get("patience")
        if not isinstance(p, int) or isinstance(p, bool) or p < 0:
            raise ValueError(f"'patience' must be an integer >= 0, got {p!r}")

    def init_state(self, n: int) -> State:
        return {"prev": np.full(n, -1, dtype=np.int64), "count": np.zeros(n, dtype=np.int64)}

    def _decide(self, k: int, logits: np.ndarray, state: State) -> Decision:
        pred = logits.argmax(-1).astype(np.int64)
        count = np.where(pred == state["prev"], state["count"] + 1, 0).astype(np.int64)
        return continue_to_next(k, count >= self.params["patience"], {"prev": pred, "count": count})


@router_for("static")
class StaticRouter(Router):
    @classmethod
    def params_of(cls, policy: Any) -> dict[str, Any]:
        return {"exit": int(policy.target)}

    def check(self) -> None:
        super().check()
        e = self.params.get("exit")
        if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < self.num_exits:
            raise ValueError(f"'exit' must be an exit index in 0..{self.num_exits - 1}, got {e!r}")

    def _decide(self, k: int, logits: np.ndarray, state: State) -> Decision:
        return continue_to_next(k, np.full(logits.shape[0], k >= self.params["exit"]), state)


@router_for("deex")
class DEExRouter(Router):
    """DEEx (:mod:`eenn.policies.deex`): at exit 0, samples below p_d are offloaded straight to the
    last exit; the others go on through the early exits with the target p_tar."""

    jumps: ClassVar[bool] = True

    @classmethod
    def params_of(cls, policy: Any) -> dict[str, Any]:
        return {"p_d": float(policy.fitted_p_d), "p_tar": float(policy.p_tar)}

    def check(self) -> None:
        super().check()
        for key in ("p_d", "p_tar"):
            v = self.params.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{key!r} must be a probability in [0, 1], got {v!r}")

    def _decide(self, k: int, logits: np.ndarray, state: State) -> Decision:
        K = self.num_exits
        p = max_prob(logits)
        if k == 0:
            offload = p < np.float32(self.params["p_d"])
            stay = np.full(offload.shape, K == 2) & ~offload
            return Decision(stay, np.where(offload, K - 1, 1).astype(np.int64), state)
        exit_now = p >= np.float32(self.params["p_tar"]) if k < K - 2 else np.ones(p.shape, dtype=bool)
        return continue_to_next(k, exit_now, state)


def build_router(name: str, num_exits: int, num_classes: int, params: dict[str, Any],
                 arrays: dict[str, np.ndarray]) -> Router:
    """The router of policy ``name``; a ValueError names an unknown policy or a bad parameter."""
    if name not in ROUTERS:
        raise ValueError(f"no runtime router for policy {name!r}; routers: {', '.join(sorted(ROUTERS))}")
    router = ROUTERS[name](name, num_exits, num_classes, params, arrays)
    router.check()
    return router
