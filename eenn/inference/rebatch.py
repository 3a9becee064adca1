"""Rebatching for streams: deep stages run at full batch size, not on ever smaller remnants.

With plain compaction, a batch of 128 in which 40% exit at exit 0 runs stage 1 on 77 samples,
stage 2 on fewer still; small batches use a CPU or GPU less efficiently per sample. Here the
samples continuing past exit k wait in a queue in front of stage k+1 until ``batch_size`` of them
have gathered (from several incoming batches), and the stream's end flushes every queue in stage
order. Each sample meets the same stages, heads and policy decisions as in the plain engine, so
the results are identical; they come back in input order. The price is latency: a sample may
wait for later batches (``ExitResult.latency_ms`` counts the wait).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import replace

import torch

from eenn.errors import EENNError
from eenn.inference.engine import Batch, Collector, EarlyExitEngine, ExitResult, Group, split_batch


class _Queue:
    """Samples waiting for one stage, kept as (group, positions) pieces: the features of a piece
    are gathered only when a batch forms, straight into that batch (one copy per sample)."""

    def __init__(self, k: int) -> None:
        self.k = k  # the stage it feeds: a group without next_exit is bound to exit k
        self.pieces: deque[tuple[Group, torch.Tensor | None]] = deque()
        self.count = 0

    def put(self, g: Group, idx: torch.Tensor | None) -> None:
        self.pieces.append((g, idx))
        self.count += len(g) if idx is None else idx.numel()

    def pop(self, m: int) -> Group:
        """The first ``min(m, count)`` waiting samples, as one group."""
        taken: list[tuple[Group, torch.Tensor | None]] = []
        need = min(m, self.count)
        self.count -= need
        while need:
            g, idx = self.pieces[0]
            avail = len(g) if idx is None else idx.numel()
            if avail <= need:
                taken.append(self.pieces.popleft())
                need -= avail
            else:  # a piece split in two: how many of each part evaluate the next head is unknown
                g = replace(g, n_here=None)
                idx = torch.arange(len(g), device=g.ids.device) if idx is None else idx
                taken.append((g, idx[:need]))
                self.pieces[0] = (g, idx[need:])
                need = 0
        return _gather(taken, self.k)


def _gather(pieces: list[tuple[Group, torch.Tensor | None]], stage: int) -> Group:
    if len(pieces) == 1:
        g, idx = pieces[0]
        return g if idx is None else g.take(idx)
    sizes = [len(g) if idx is None else idx.numel() for g, idx in pieces]
    first = pieces[0][0].h
    multiscale = not isinstance(first, torch.Tensor)
    maps = []
    for scale in range(len(first) if multiscale else 1):
        parts = [(g.h[scale] if multiscale else g.h, idx) for g, idx in pieces]
        maps.append(_gather_map(parts, sizes))
    h = maps if multiscale else maps[0]
    smalls = [
        g.small() if idx is None else {k: v.index_select(0, idx) for k, v in g.small().items()} for g, idx in pieces
    ]
    if any("next_exit" in s for s in smalls):  # some pieces name their next exits: spell out the others'
        for s, n, (g, _) in zip(smalls, sizes, pieces):
            s.setdefault("next_exit", torch.full((n,), stage, dtype=torch.int64, device=g.ids.device))
    here = [g.n_here for g, _ in pieces]
    n_here = None if None in here else sum(here)  # type: ignore[arg-type]
    return Group.from_small(h, {k: torch.cat([s[k] for s in smalls]) for k in smalls[0]}, n_here)


def _gather_map(parts: list[tuple[torch.Tensor, torch.Tensor | None]], sizes: list[int]) -> torch.Tensor:
    """Concatenate the selected rows of several feature maps straight into one new tensor."""
    h = parts[0][0].new_empty((sum(sizes), *parts[0][0].shape[1:]))
    start = 0
    for (t, idx), n in zip(parts, sizes):
        if idx is None:
            h[start : start + n].copy_(t)
        else:
            torch.index_select(t, 0, idx.to(t.device), out=h[start : start + n])
        start += n
    return h


class Rebatcher:
    """Stream batches through ``engine`` with a queue of up to ``batch_size`` samples per stage."""

    def __init__(self, engine: EarlyExitEngine, batch_size: int) -> None:
        if batch_size < 1:
            raise EENNError(f"batch_size must be >= 1 for rebatching, got {batch_size}.")
        self.engine, self.batch_size = engine, batch_size

    @torch.inference_mode()
    def run(self, batches: Iterable[Batch]) -> ExitResult:
        engine = self.engine
        out = Collector(engine.num_exits)
        queues = [_Queue(k) for k in range(engine.num_exits)]
        engine.policy_s, n, t0 = 0.0, 0, time.perf_counter()
        for batch in batches:
            x, y = split_batch(batch)
            if y is not None:
                out.labels.append(y)
            queues[0].put(engine.admit(x, n), None)
            n += x.shape[0]
            self._drain(queues, out, flush=False)
        self._drain(queues, out, flush=True)
        engine.sync()
        return out.result(time.perf_counter() - t0, engine.policy_s)

    def _drain(self, queues: list[_Queue], out: Collector, flush: bool) -> None:
        """Run every full batch, stage by stage (a stage's output can fill the next queue);
        ``flush``: also the partial ones left at the end of the stream."""
        for k, q in enumerate(queues):
            while q.count >= self.batch_size or (flush and q.count):
                step = self.engine.advance(k, q.pop(self.batch_size), out)
                if step is not None:
                    queues[k + 1].put(*step)
