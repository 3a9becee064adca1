"""The early-exit engine: inference that really skips the layers a sample does not need.

A batch runs stage by stage. After stage k, the samples whose next exit is k evaluate exit k's
head and the policy decides; those that exit leave with their answer, the others are gathered
into a smaller batch (``index_select``: compaction, not masking) and carry on with their features
and their policy state. A sample the policy sends to exit j > k+1 (DEEx's offload to the backbone)
runs stages k+1..j without evaluating the heads in between. Nothing is computed for a sample after
it left, so its realised cost is the backbone stages up to its exit plus the heads it evaluated.
At the last exit everyone answers (``decide``'s rule), so the engine does not ask the policy there,
as the deployment bundle has no decision graph there.

The policy's ``decide`` is the very function offline :func:`eenn.policies.simulate.simulate`
calls on the same compacted subsets, so the engine reproduces the offline exits (up to float
differences of the network's logits between batch sizes).

Usage::

    engine = EarlyExitEngine(network, FitRun(fit_dir).policy())  # or ExitPolicy.load(path)
    out = engine.run(loader)                      # batched: a dataset streamed in batches
    out = engine.run(single_samples(x))           # single-sample: per-request latency
    out.cost(profile, "macs")                     # realised per-sample cost
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch

from eenn.cost import CostProfile
from eenn.errors import EENNError
from eenn.models.multi_exit import Features, MultiExitNetwork
from eenn.policies.base import Decision, ExitPolicy, State
from eenn.policies.simulate import realised_cost
from eenn.utils.compile import Compiled, make_room

Batch = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]


def take_features(h: Features, idx: torch.Tensor) -> Features:
    """Rows ``idx`` of a feature map, or of each map of a multi-scale (MSDNet) list."""
    if isinstance(h, torch.Tensor):
        return h.index_select(0, idx.to(h.device))
    return [t.index_select(0, idx.to(t.device)) for t in h]


def first_true(mask: torch.Tensor, n: int) -> torch.Tensor:
    """The positions of ``mask``'s ``n`` true entries, ascending, when the host knows ``n``: on a
    GPU a stable sort, which needs no synchronisation (``nonzero`` asks the device for the count);
    on the CPU ``nonzero``, which is cheaper there and synchronises nothing."""
    if mask.device.type == "cpu":
        return mask.nonzero().squeeze(1)
    return torch.argsort((~mask).to(torch.uint8), stable=True)[:n]


@dataclass
class Group:
    """Samples travelling together, every tensor on the engine's device: their features, ids in the
    stream, next exit (None: every sample's is the exit after the next stage to run, as after an
    ``onward`` decision), policy state, heads evaluated and arrival time. ``n_here``: how many of the
    samples that carry on (all, or those at the positions handed on with the group) evaluate the
    next exit's head, when the host knows it without asking the device; None: ask."""

    h: Features  # (B, ...) input of the next stage to run
    ids: torch.Tensor  # (B,) int64
    next_exit: torch.Tensor | None  # (B,) int64
    state: State
    heads: torch.Tensor  # (B, K) bool
    arrival: torch.Tensor  # (B,) float64, perf_counter seconds
    n_here: int | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def small(self) -> dict[str, torch.Tensor]:
        """The per-sample tensors (everything but the features; ``next_exit`` only if it is one)."""
        small = {"ids": self.ids, "heads": self.heads, "arrival": self.arrival}
        if self.next_exit is not None:
            small["next_exit"] = self.next_exit
        return small | {f"state.{k}": v for k, v in self.state.items()}

    @staticmethod
    def from_small(h: Features, small: dict[str, torch.Tensor], n_here: int | None = None) -> Group:
        state = {k[6:]: v for k, v in small.items() if k.startswith("state.")}
        return Group(h, small["ids"], small.get("next_exit"), state, small["heads"], small["arrival"], n_here)

    def take(self, idx: torch.Tensor) -> Group:
        """The samples at positions ``idx``, gathered into a new, smaller group (``n_here`` counts
        among them, as it does for a group handed on with positions)."""
        small = {k: v.index_select(0, idx) for k, v in self.small().items()}
        return Group.from_small(take_features(self.h, idx), small, self.n_here)


@dataclass
class Exited:
    """Samples that answered at one exit (tensors on the engine's device)."""

    ids: torch.Tensor
    exit: int
    logits: torch.Tensor  # (b, C)
    heads: torch.Tensor
    arrival: torch.Tensor
    done: float


@dataclass
class ExitResult:
    """Per-sample outcome of an engine run, in input order."""

    predictions: torch.Tensor  # (N,) int64
    exit_index: torch.Tensor  # (N,) int64
    heads_evaluated: torch.Tensor  # (N, K) bool
    logits: torch.Tensor  # (N, C) float32: the answering exit's logits
    latency_ms: torch.Tensor  # (N,) float64: from its batch's arrival to its answer
    wall_s: float  # the whole run
    policy_s: float  # time spent in policy.decide
    labels: torch.Tensor | None = None
    stage_batch_sizes: list[list[int]] = field(default_factory=list)  # per stage, the batches it ran

    @property
    def num_samples(self) -> int:
        return self.exit_index.shape[0]

    def cost(self, profile: CostProfile, unit: str = "macs") -> torch.Tensor:
        """Realised per-sample cost (N,) float64: backbone stages up to the exit plus the heads evaluated."""
        costs = torch.tensor(profile.per_exit(unit), dtype=torch.float64)
        heads = torch.tensor(profile.per_head(unit), dtype=torch.float64)
        return realised_cost(self.exit_index, self.heads_evaluated, costs, heads)

    def exit_fractions(self) -> list[float]:
        K = self.heads_evaluated.shape[1]
        return (torch.bincount(self.exit_index, minlength=K).double() / self.num_samples).tolist()

    def accuracy(self) -> float | None:
        if self.labels is None:
            return None
        return float((self.predictions == self.labels).double().mean())


class Collector:
    """Gathers exited samples and answers in input order (streams finish samples out of order)."""

    def __init__(self, num_stages: int) -> None:
        self.parts: list[Exited] = []
        self.labels: list[torch.Tensor] = []
        self.stage_batch_sizes: list[list[int]] = [[] for _ in range(num_stages)]

    def result(self, wall_s: float, policy_s: float) -> ExitResult:
        """The samples in input order, on the CPU (one copy of each kind from the device, at the end)."""
        if not self.parts:
            raise EENNError("the engine got no samples: the input stream is empty.")
        ids = torch.cat([p.ids for p in self.parts]).cpu()
        order = torch.empty_like(ids)
        order[ids] = torch.arange(ids.numel())  # ids are 0..N-1, each once
        exits = torch.cat([torch.full((p.ids.numel(),), p.exit, dtype=torch.int64) for p in self.parts])
        logits = torch.cat([p.logits for p in self.parts]).cpu()
        done = torch.cat([torch.full((p.ids.numel(),), p.done, dtype=torch.float64) for p in self.parts])
        latency = (done - torch.cat([p.arrival for p in self.parts]).cpu()) * 1e3
        return ExitResult(
            predictions=logits.argmax(-1)[order],
            exit_index=exits[order],
            heads_evaluated=torch.cat([p.heads for p in self.parts]).cpu()[order],
            logits=logits[order],
            latency_ms=latency[order],
            wall_s=wall_s,
            policy_s=policy_s,
            labels=torch.cat(self.labels) if self.labels else None,
            stage_batch_sizes=self.stage_batch_sizes,
        )


def split_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A loader's (x, y) or a bare tensor x."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    return batch[0], (batch[1] if len(batch) > 1 else None)


def batches_of(x: torch.Tensor, batch_size: int, y: torch.Tensor | None = None) -> Iterator[Batch]:
    """Stream a tensor in batches (batch_size 1: single-sample requests)."""
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size] if y is None else (x[i : i + batch_size], y[i : i + batch_size])


class EarlyExitEngine:
    """Run ``network`` with ``policy`` deciding after every exit (see the module docstring).

    ``compile`` runs every stage and head, and the plain backbone the speedup is measured against,
    through ``torch.compile`` with a dynamic batch dimension (compaction hands each segment a
    different batch size: one graph serves them all, plus one for batches of one); a segment that
    does not compile runs eagerly, with one warning line."""

    def __init__(
        self,
        network: MultiExitNetwork,
        policy: ExitPolicy,
        device: torch.device | str | None = None,
        compile: bool = False,
    ) -> None:
        if policy.num_exits is None:
            raise EENNError(f"policy {policy.name!r} is not fitted: fit it (eenn-fit) before inference.")
        if policy.num_exits != network.num_exits:
            raise EENNError(
                f"the policy was fitted on {policy.num_exits} exits but the network has {network.num_exits}."
            )
        if not policy.online:
            raise EENNError(
                f"policy {policy.name!r} reads the labels (an oracle): it runs on saved predictions only, not online."
            )
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        self.network = network.to(self.device).eval()
        # decisions run where the logits are: a copy of the policy moves there (the caller's stays put)
        self.policy = policy if policy.device == self.device else copy.deepcopy(policy).to(self.device)
        self.policy_s = 0.0
        stages, heads = list(network.stages), list(network.heads)
        self.backbone: Callable[[torch.Tensor], torch.Tensor] = network.forward_backbone
        if compile:
            make_room(len(stages) + len(heads) + 1)
            stages = [Compiled(m, "compile=true", f"stage {k}", dynamic=True) for k, m in enumerate(stages)]
            heads = [Compiled(m, "compile=true", f"exit head {k}", dynamic=True) for k, m in enumerate(heads)]
            self.backbone = Compiled(network.forward_backbone, "compile=true", "the backbone", dynamic=True)
        self.stages, self.heads = stages, heads

    @property
    def num_exits(self) -> int:
        return self.network.num_exits

    def admit(self, x: torch.Tensor, first_id: int) -> Group:
        """A fresh batch entering stage 0, its samples numbered from ``first_id``."""
        n, dev = x.shape[0], self.device
        return Group(
            h=x.to(dev, non_blocking=True),
            ids=torch.arange(first_id, first_id + n, device=dev),
            next_exit=None,
            state=self.policy.init_state(n),
            heads=torch.zeros(n, self.num_exits, dtype=torch.bool, device=dev),
            arrival=torch.full((n,), time.perf_counter(), dtype=torch.float64, device=dev),
            n_here=n,
        )

    def advance(self, k: int, g: Group, out: Collector) -> tuple[Group, torch.Tensor | None] | None:
        """Run stage k on ``g``; evaluate exit k for the samples bound to it and let the policy decide.
        Exited samples go to ``out``. Returns the group after stage k and the positions of its
        continuing samples, for the caller to gather (None: all continue), or None if none continue.

        Everything stays on the device; the host asks it one thing per early exit, in one read: how many
        samples carry on, how many of those evaluate the next head, and how many the policy sent
        to an impossible exit (the sizes of the next gathers, and the policy's sanity). After an
        ``onward`` decision, only the first: everyone who carries on evaluates the next head."""
        out.stage_batch_sizes[k].append(len(g))
        h = self.stages[k](g.h)
        if k == self.num_exits - 1:  # everyone here is bound to the last exit, which answers: no decision
            heads = g.heads.clone()
            heads[:, k] = True
            out.parts.append(Exited(g.ids, k, self.heads[k](h).float(), heads, g.arrival, time.perf_counter()))
            return None
        if g.n_here is not None:
            n_here = g.n_here
        else:
            n_here = len(g) if g.next_exit is None else int((g.next_exit == k).sum())
        if n_here == 0:  # all jump past this exit (offloaded by DEEx): no head evaluated
            return replace(g, h=h, n_here=None), None
        sel = None if n_here == len(g) or g.next_exit is None else first_true(g.next_exit == k, n_here)
        h_k = h if sel is None else take_features(h, sel)
        logits = self.heads[k](h_k).float()
        state = g.state if sel is None else {n: v.index_select(0, sel) for n, v in g.state.items()}
        d = self.decide(k, logits, state)
        heads = g.heads.clone()
        if sel is None:
            heads[:, k] = True
            next_exit = None if d.onward else d.next_exit  # onward: all who carry on are bound to k + 1
            new_state, exited = d.state, d.exit
        else:
            assert g.next_exit is not None  # only a known next exit leaves samples out of exit k
            heads[:, k].index_fill_(0, sel, True)
            next_exit = g.next_exit.index_copy(0, sel, d.next_exit)
            new_state = {n: v.index_copy(0, sel, d.state[n]) for n, v in g.state.items()}
            exited = torch.zeros(len(g), dtype=torch.bool, device=d.exit.device).index_copy(0, sel, d.exit)
        if next_exit is None:
            n_on = n_next = len(g) - int(exited.sum())
        else:
            carry_on = ~exited
            counts = [carry_on.sum(), (carry_on & (next_exit == k + 1)).sum()]
            if not d.onward:  # a jumping policy: check its targets
                counts.append((~d.exit & ((d.next_exit <= k) | (d.next_exit >= self.num_exits))).sum())
            n_on, n_next, *n_bad = torch.stack(counts).tolist()
            if n_bad and n_bad[0]:
                raise RuntimeError(
                    f"policy {self.policy.name!r} sent samples at exit {k} to an exit outside "
                    f"{k + 1}..{self.num_exits - 1}"
                )
        n_exited = len(g) - n_on
        if n_exited:
            everyone = n_on == 0
            pos = None if everyone else first_true(exited, n_exited)
            at_k = None if everyone and sel is None else first_true(d.exit, n_exited)
            out.parts.append(
                Exited(
                    g.ids if pos is None else g.ids.index_select(0, pos),
                    k,
                    logits if at_k is None else logits.index_select(0, at_k),
                    heads if pos is None else heads.index_select(0, pos),
                    g.arrival if pos is None else g.arrival.index_select(0, pos),
                    time.perf_counter(),
                )
            )
        if n_on == 0:
            return None
        g = Group(h, g.ids, next_exit, new_state, heads, g.arrival, n_next)
        return g, (first_true(~exited, n_on) if n_exited else None)

    def decide(self, k: int, logits: torch.Tensor, state: State) -> Decision:
        """The policy's decision at exit k, on one intra-op thread, its time added to ``policy_s``.

        A decision works on (B, C) tensors, far too small to gain from threads, yet some of its ops
        fork a thread team even there (CPU softmax and log-softmax do on 128 x 10): each fork and
        join costs more than the op, and when another process holds a core the join waits for the
        descheduled thread, milliseconds per decision. Profiled on 2 cores with one of them busy,
        decisions took 0.5-0.9% of the backbone's time at batch 128, 15-20x their single-threaded
        cost. The network's stages keep every thread."""
        threads = torch.get_num_threads() if logits.device.type == "cpu" else 1
        t = time.perf_counter()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            return self.policy.decide(k, logits, state)
        finally:
            if threads > 1:
                torch.set_num_threads(threads)
            self.policy_s += time.perf_counter() - t

    def run_group(self, g: Group, out: Collector) -> None:
        """Carry one group through the stages until every sample has exited."""
        for k in range(self.num_exits):
            step = self.advance(k, g, out)
            if step is None:
                return
            g, keep = step
            if keep is not None:
                g = g.take(keep)

    @torch.inference_mode()
    def run(self, batches: Iterable[Batch]) -> ExitResult:
        """Run a stream of batches (tensors or (x, y) pairs) one after the other."""
        out = Collector(self.num_exits)
        self.policy_s, n, t0 = 0.0, 0, time.perf_counter()
        for batch in batches:
            x, y = split_batch(batch)
            if y is not None:
                out.labels.append(y)
            self.run_group(self.admit(x, n), out)
            n += x.shape[0]
        self.sync()
        return out.result(time.perf_counter() - t0, self.policy_s)

    def run_batch(self, x: torch.Tensor) -> ExitResult:
        """One batch."""
        return self.run([x])

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@torch.inference_mode()
def time_backbone(
    network: MultiExitNetwork, batches: Iterable[Batch], forward: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> float:
    """Seconds for the plain backbone (no early-exit heads) over the batches: the speedup baseline.
    ``forward``: what runs it (default ``network.forward_backbone``; an engine's ``backbone``, compiled with it)."""
    device = next(network.parameters()).device
    forward = forward or network.forward_backbone
    t0 = time.perf_counter()
    for batch in batches:
        forward(split_batch(batch)[0].to(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def single_samples(x: torch.Tensor, y: torch.Tensor | None = None) -> Iterator[Batch]:
    """Single-sample mode: each sample is its own request (batch of one)."""
    return batches_of(x, 1, y)
