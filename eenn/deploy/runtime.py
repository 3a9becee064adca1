"""Real early exit in ONNX Runtime, with numpy alone beside it: no PyTorch.

A batch runs segment by segment, as :class:`eenn.inference.engine.EarlyExitEngine` runs it in
PyTorch. Segment k (stage k, its exit head and the policy's decision there, all in one graph)
says for the samples whose next exit is k whether they exit; those leave with their answer, and
only the others are gathered (compaction) and go on into segment k+1 with their activations and
policy state. A sample sent past exits (DEEx) runs the stages in between without their heads (the
bundle then holds the middle stages and heads apart). Nothing runs for a sample after it left.
The runtime decides nothing itself: the rules are the policy's own, traced into the graphs.

    rt = Runtime("outputs/export/runs/<run>/bundle")        # or the eenn-export run dir
    out = rt.predict(rt.bundle.normalise(uint8_images))     # or already normalised float32 input
    out.classes, out.exits, out.logits
"""

from __future__ import annotations

import time
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eenn.deploy.bundle import BACKBONE, MANIFEST, Bundle, exit_file, segment_file, stage_file
from eenn.errors import EENNError

State = dict[str, np.ndarray]


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise EENNError(
            "the eenn.deploy runtime needs onnxruntime: pip install onnxruntime (or pip install 'eenn[deploy]')."
        ) from None
    return onnxruntime


@dataclass
class Prediction:
    """Per-sample outcome, in input order."""

    classes: np.ndarray  # (N,) int64: the predicted class
    exits: np.ndarray  # (N,) int64: the exit that answered
    logits: np.ndarray  # (N, C) float32: that exit's logits
    heads: np.ndarray  # (N, K) bool: the heads each sample evaluated
    latency_ms: np.ndarray  # (N,) float64: from its batch's start to its answer
    wall_s: float  # the whole call
    decision_s: float  # time spent on the decisions' outputs outside the graphs (reading, state, next exits)
    stage_batch_sizes: list[list[int]] = field(default_factory=list)  # per stage, the batches it ran

    @property
    def num_samples(self) -> int:
        return int(self.exits.shape[0])


@dataclass
class _Group:
    h: list[np.ndarray]  # the next stage's inputs (one array, or several for multi-scale features)
    ids: np.ndarray
    next_exit: np.ndarray
    state: State
    heads: np.ndarray

    def take(self, idx: np.ndarray) -> _Group:
        return _Group(
            [a[idx] for a in self.h],
            self.ids[idx],
            self.next_exit[idx],
            {k: v[idx] for k, v in self.state.items()},
            self.heads[idx],
        )


@dataclass
class _Graph:
    """An ONNX Runtime session and where its outputs are, read once: a batch-1 request runs a few
    graphs, and asking the session for its names on every run costs more than the decision."""

    session: Any
    inputs: list[str]
    outputs: dict[str, int]
    state_names: InitVar[list[str]]  # the bundle's, in the order the graphs hand the state on

    def __post_init__(self, state_names: list[str]) -> None:
        o = self.outputs
        self.logits: int | None = o.get("logits")
        self.exit: int | None = o.get("exit")  # a graph that decides; the last segment and stages do not
        self.next_exit: int | None = o.get("next_exit")
        self.state_out = [o[f"state_out_{name}"] for name in state_names] if self.exit is not None else []

    def run(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, dict(zip(self.inputs, feeds)))


class Runtime:
    """A bundle's segments in ONNX Runtime sessions.

    ``providers``: ONNX Runtime execution providers (default: the CPU's); ``threads``: intra-op
    threads per session (default: ONNX Runtime's choice)."""

    def __init__(
        self,
        bundle: str | Path | Bundle,
        providers: list[str] | None = None,
        threads: int | None = None,
        verify: bool = True,
    ) -> None:
        ort = _onnxruntime()
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle, verify=verify)
        self.policy = self.bundle.policy()  # the record of what the graphs decide with, checked against the manifest
        self.state_names = self.bundle.state_names
        self.options = ort.SessionOptions()
        # every segment is a session with its own thread pool, whose threads spin for a while after
        # each run: the next segment's pool then shares the cores with them. On 2 cores a bundle
        # whose samples nearly all left at the first exit ran about as slowly as the plain network,
        # not at its first segment's speed. Spinning stays on within a run, where it saves the
        # wake-up of every operator.
        self.options.add_session_config_entry("session.force_spinning_stop", "1")
        if threads is not None:
            self.options.intra_op_num_threads = int(threads)
            self.options.inter_op_num_threads = 1
        self.providers = providers or ["CPUExecutionProvider"]
        K = self.bundle.num_exits
        self.segments = [self._session(segment_file(k)) for k in range(K)]
        # the middle stages and heads apart, for groups where some samples skip the head
        middle = range(1, K - 1) if self.bundle.jumps else range(0)
        self.stages = {k: self._session(stage_file(k)) for k in middle}
        self.heads = {k: self._session(exit_file(k)) for k in middle}
        self._backbone: _Graph | None = None

    def _session(self, name: str) -> _Graph:
        return self._load(self.bundle.file(name))

    def _load(self, path: Path) -> _Graph:
        """An ONNX graph in a session with this runtime's options and providers."""
        ort = _onnxruntime()
        try:
            session = ort.InferenceSession(str(path), sess_options=self.options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types for a bad graph
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EENNError(f"{str(path)!r} is not an ONNX graph ONNX Runtime can load ({reason}).") from None
        outputs = {o.name: i for i, o in enumerate(session.get_outputs())}
        missing = [n for n in self.state_names if "exit" in outputs and f"state_out_{n}" not in outputs]
        if missing:
            raise EENNError(
                f"{str(self.bundle.path / MANIFEST)!r}: 'policy.state' names {missing[0]!r}, but "
                f"{path.name} has no output 'state_out_{missing[0]}'."
            )
        return _Graph(session, [i.name for i in session.get_inputs()], outputs, self.state_names)

    @property
    def num_exits(self) -> int:
        return self.bundle.num_exits

    # ------------------------------------------------------------------ checks
    def check_input(self, x: Any) -> np.ndarray:
        """``x`` as the float32 (N, *input.shape) array the bundle takes, else an EENNError."""
        if not isinstance(x, np.ndarray):
            raise EENNError(
                f"the runtime takes a numpy array of shape (N, {', '.join(map(str, self.bundle.input_shape))}), "
                f"got {type(x).__name__}."
            )
        shape = self.bundle.input_shape
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise EENNError(
                f"input of shape {tuple(x.shape)} does not match the manifest's input.shape {list(shape)} "
                "(with a leading batch axis)."
            )
        if x.shape[0] == 0:
            raise EENNError("the input holds no samples.")
        if x.dtype != np.float32:
            if x.dtype == np.uint8:
                raise EENNError(
                    "the input is uint8 images: normalise them first (Runtime.bundle.normalise) into the "
                    "manifest's input.dtype float32."
                )
            x = x.astype(np.float32)
        return np.ascontiguousarray(x)

    # --------------------------------------------------------------- running
    def predict(self, x: np.ndarray, batch_size: int | None = None) -> Prediction:
        """Classes, exits and logits for ``x`` (N, *input.shape) float32, run in batches of
        ``batch_size`` (default: one batch)."""
        x = self.check_input(x)
        n, K, C = x.shape[0], self.num_exits, self.bundle.num_classes
        bs = n if batch_size is None else int(batch_size)
        if bs < 1:
            raise EENNError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        exits = np.empty(n, dtype=np.int64)
        logits = np.empty((n, C), dtype=np.float32)
        heads = np.zeros((n, K), dtype=bool)
        done = np.empty(n, dtype=np.float64)
        arrival = np.empty(n, dtype=np.float64)
        sizes: list[list[int]] = [[] for _ in range(K)]
        self.decision_s = 0.0
        t0 = time.perf_counter()
        if bs == 1:
            self._predict_single(x, exits, logits, heads, done, arrival, sizes)
        else:
            for a in range(0, n, bs):
                b = min(n, a + bs) - a
                arrival[a : a + b] = time.perf_counter()
                # exit 0's graph builds the policy's initial state itself
                g = _Group(
                    [x[a : a + b]], np.arange(a, a + b), np.zeros(b, dtype=np.int64), {}, np.zeros((b, K), dtype=bool)
                )
                for k in range(K):
                    sizes[k].append(len(g.ids))
                    g = self._advance(k, g, exits, logits, heads, done)
                    if g is None:
                        break
        wall = time.perf_counter() - t0
        return Prediction(logits.argmax(-1), exits, logits, heads, (done - arrival) * 1e3, wall, self.decision_s, sizes)

    def _predict_single(
        self,
        x: np.ndarray,
        exits: np.ndarray,
        logits: np.ndarray,
        heads: np.ndarray,
        done: np.ndarray,
        arrival: np.ndarray,
        sizes: list[list[int]],
    ) -> None:
        """One request at a time: no groups to compact, so none of the batch path's array
        bookkeeping between graphs, which at batch 1 costs as much as a small segment's last layers."""
        last = self.num_exits - 1
        jumps = self.bundle.jumps
        for i in range(x.shape[0]):
            arrival[i] = time.perf_counter()
            h: list[np.ndarray] = [x[i : i + 1]]
            state: list[np.ndarray] = []
            k = 0
            while True:
                graph = self.segments[k]
                outs = graph.run(h + state if k < last else h)  # the last graph decides nothing: no state
                sizes[k].append(1)
                heads[i, k] = True
                t = time.perf_counter()
                if k == last or outs[graph.exit][0]:
                    self.decision_s += time.perf_counter() - t
                    break
                nxt = int(outs[graph.next_exit][0]) if jumps else k + 1
                state = [outs[j] for j in graph.state_out]
                self.decision_s += time.perf_counter() - t
                h = outs[: graph.logits]
                for j in range(k + 1, nxt):  # sent past these exits: their stages without the heads
                    h = self.stages[j].run(h)
                    sizes[j].append(1)
                k = nxt
            exits[i] = k
            logits[i] = outs[graph.logits][0]
            done[i] = time.perf_counter()

    def _advance(
        self, k: int, g: _Group, exits: np.ndarray, logits: np.ndarray, heads: np.ndarray, done: np.ndarray
    ) -> _Group | None:
        """Stage k, with exit k's head and decision for the samples bound to it; the exited samples
        written out; the continuing samples' group, or None."""
        here = g.next_exit == k
        n_here = int(here.sum())
        # exit 0's graph builds the initial state, and the last one decides nothing
        state = [g.state[name] for name in self.state_names] if 0 < k < self.num_exits - 1 else []
        if n_here == len(g.ids):
            graph = self.segments[k]
            outs = graph.run(g.h + state)
            h, sel = outs[: graph.logits], None
        else:
            h = self.stages[k].run(g.h)
            if n_here == 0:  # all sent past this exit: no head runs
                g.h = h
                return g
            graph = self.heads[k]
            sel = np.flatnonzero(here)
            outs = graph.run([a[sel] for a in h] + [v[sel] for v in state])
        lk = outs[graph.logits]
        rows = np.arange(len(g.ids)) if sel is None else sel
        g.heads[rows, k] = True
        t = time.perf_counter()
        if k == self.num_exits - 1:  # the last exit answers for everyone
            out = rows
            leaving = slice(None)
        else:
            leaving = outs[graph.exit]
            out = rows[leaving]
            g.next_exit[rows] = outs[graph.next_exit] if self.bundle.jumps else k + 1
            new = {name: outs[j] for name, j in zip(self.state_names, graph.state_out)}
            if sel is None:
                g.state = new
            else:
                for name, v in new.items():
                    g.state[name][rows] = v
        self.decision_s += time.perf_counter() - t
        if out.size:
            ids = g.ids[out]
            exits[ids] = k
            logits[ids] = lk[leaving]
            heads[ids] = g.heads[out]
            done[ids] = time.perf_counter()
        if out.size == len(g.ids):
            return None
        g.h = h
        if out.size == 0:
            return g
        keep = np.ones(len(g.ids), dtype=bool)
        keep[out] = False
        return g.take(np.flatnonzero(keep))

    # ------------------------------------------------------------- baseline
    def predict_backbone(self, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """The plain backbone's logits (``backbone.onnx``, every layer for every sample): the
        baseline the early-exit speedup is measured against."""
        if self._backbone is None:
            self._backbone = self._session(BACKBONE)
        x = self.check_input(x)
        bs = x.shape[0] if batch_size is None else int(batch_size)
        return np.concatenate([self._backbone.run([x[a : a + bs]])[0] for a in range(0, x.shape[0], bs)])
