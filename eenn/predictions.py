"""The predictions file: the contract between stage 1 (training) and stage 2 (policies).

A safetensors file (no pickle) holding

- ``logits``  float32 (N, K, C): every exit's logits for every sample,
- ``labels``  int64 (N,),
- ``costs``   float64 (K,): what a sample pays to get its answer at exit k, in ``cost_unit``,
- optionally ``head_costs`` float64 (K,): each exit head's own overhead, included in ``costs``
  (a sample that skips a head, as DEEx's offloaded samples do, does not pay it),
- optionally ``cost_table.<unit>`` and ``head_cost_table.<unit>`` float64 (K,) for other units
  (``macs``, ``latency_ms``, ...),

and string metadata: ``format``, ``cost_unit``, ``exit_names`` and ``class_names`` (JSON lists),
``split`` and ``source_run``.

A loaded file's tensors are views of a memory map of the file, not copies: a 100,000 x 5 x 1,000
file is 1.9 GB, and the passes over it go in row blocks (:meth:`Predictions.row_blocks`) that
hand each block's pages back behind them, so memory holds a block, not the file. Loaded logits
are read-only by convention (in-place changes are lost where pages are handed back).
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eenn.errors import EENNError
from eenn.utils.io import map_safetensors, write_safetensors

FORMAT = "eenn.predictions/1"
#: the held-out splits a stage-1 run predicts: stage 2 fits on val and reports on test
SPLITS = ("val", "test")
#: ``cost=`` settings whose name differs from the files' cost unit
COST_ALIASES = {"latency": "latency_ms"}
#: the bytes of logits one row block holds (:meth:`Predictions.row_blocks`)
BLOCK_BYTES = 64 * 2**20


def block_rows(logits: torch.Tensor) -> int:
    """Rows of logits (N, K, C) per block of a pass that goes in row blocks: ``BLOCK_BYTES`` of them."""
    return max(1, BLOCK_BYTES // max(1, logits[0].numel() * logits.element_size()))


def cost_unit_name(cost: str) -> str:
    """The cost unit a ``cost=`` setting names (``latency`` is the files' ``latency_ms``)."""
    return COST_ALIASES.get(cost, cost)


@dataclass
class Predictions:
    logits: torch.Tensor  # (N, K, C) float32
    labels: torch.Tensor  # (N,) int64
    costs: torch.Tensor  # (K,) float64, cumulative cost of reaching exit k
    cost_unit: str = "flops"
    exit_names: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    split: str = ""
    source_run: str = ""
    cost_table: dict[str, torch.Tensor] = field(default_factory=dict)
    head_costs: torch.Tensor | None = None
    head_cost_table: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the file's memory map where ``logits`` is a view of it (set by :meth:`load`)
    mapping: mmap.mmap | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.logits = self.logits.detach().to(torch.float32).cpu().contiguous()
        if self.mapping is not None and not _inside(self.logits, self.mapping):
            self.mapping = None  # converted to a copy: nothing of the map to hand back
        self.labels = self.labels.detach().to(torch.int64).cpu().contiguous()
        self.costs = torch.as_tensor(self.costs, dtype=torch.float64).cpu().contiguous()
        as64 = lambda v: torch.as_tensor(v, dtype=torch.float64).cpu().contiguous()  # noqa: E731
        self.cost_table = {k: as64(v) for k, v in self.cost_table.items()}
        self.head_cost_table = {k: as64(v) for k, v in self.head_cost_table.items()}
        if self.head_costs is not None:
            self.head_costs = as64(self.head_costs)
        if not self.exit_names:
            self.exit_names = [f"exit{k}" for k in range(self.num_exits)]
        if not self.class_names:
            self.class_names = [str(c) for c in range(self.num_classes)]

    @property
    def num_samples(self) -> int:
        return self.logits.shape[0]

    @property
    def num_exits(self) -> int:
        return self.logits.shape[1]

    @property
    def num_classes(self) -> int:
        return self.logits.shape[2]

    def row_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, logits of the block's rows) over the samples in order; a memory-mapped
        file's pages are handed back behind each block, so a whole pass holds one block."""
        rows = block_rows(self.logits)
        for a in range(0, self.num_samples, rows):
            yield a, self.logits[a : a + rows]
            # every row so far, not the block's only: on a fault the kernel maps the page's
            # neighbours too, some of which lie behind the block
            self.release(slice(0, a + rows))

    def release(self, rows: slice = slice(None)) -> None:
        """Hand back the resident pages of ``rows`` of a memory-mapped file's logits (all by
        default); touching them again reads them again from the page cache. No-op for logits in
        memory."""
        if self.mapping is None:
            return
        a, b, _ = rows.indices(self.num_samples)
        if b <= a:
            return
        row = self.logits[0].numel() * self.logits.element_size()
        start = self.logits.data_ptr() - _address(self.mapping) + a * row
        page = start - start % mmap.PAGESIZE
        self.mapping.madvise(mmap.MADV_DONTNEED, page, start + (b - a) * row - page)

    def costs_in(self, unit: str) -> torch.Tensor:
        """Per-exit costs in ``unit`` (the file's own unit or one of its ``cost_table`` units)."""
        if unit == self.cost_unit:
            return self.costs
        if unit in self.cost_table:
            return self.cost_table[unit]
        have = sorted({self.cost_unit, *self.cost_table})
        raise EENNError(f"cost unit {unit!r} is not in the predictions file; it has {have}.")

    def head_costs_in(self, unit: str) -> torch.Tensor:
        """Per-exit head overheads in ``unit``; zeros when the file does not say (heads then count
        as part of the backbone: skipping one saves nothing)."""
        table = {self.cost_unit: self.head_costs, **self.head_cost_table}
        heads = table.get(unit)
        return heads if heads is not None else torch.zeros_like(self.costs_in(unit))

    def scaled(self, temperature: torch.Tensor | None) -> Predictions:
        """These predictions with exit k's logits divided by ``temperature[k]`` (float32, the
        division :meth:`eenn.policies.base.ExitPolicy.decide` makes); themselves for None."""
        if temperature is None:
            return self
        return dataclasses.replace(
            self, logits=self.logits / temperature.to(torch.float32)[None, :, None], mapping=None
        )

    def select(self, rows: torch.Tensor) -> Predictions:
        """These predictions restricted to ``rows`` (int64 indices, in that order; repeats allowed),
        the logits copied out of any memory map."""
        return dataclasses.replace(
            self, logits=self.logits.index_select(0, rows), labels=self.labels.index_select(0, rows), mapping=None
        )

    def accuracy_per_exit(self) -> torch.Tensor:
        return (self.logits.argmax(-1) == self.labels[:, None]).double().mean(0)

    def validate(self, source: str = "predictions") -> None:
        """Check shapes, dtypes and values; raise one clear EENNError naming ``source``."""
        if self.logits.ndim != 3:
            raise EENNError(f"{source}: logits must have shape (N, K, C), got {tuple(self.logits.shape)}.")
        n, k, c = self.logits.shape
        if n == 0 or k == 0 or c < 2:
            raise EENNError(f"{source}: expected N>0 samples, K>0 exits, C>=2 classes, got {(n, k, c)}.")
        if tuple(self.labels.shape) != (n,):
            raise EENNError(f"{source}: labels must have shape ({n},), got {tuple(self.labels.shape)}.")
        if tuple(self.costs.shape) != (k,):
            raise EENNError(f"{source}: costs must have shape ({k},), got {tuple(self.costs.shape)}.")
        # per row block: a full-size boolean mask of a large file would double its memory
        bad = sum(int((~torch.isfinite(block)).flatten(1).any(1).sum()) for _, block in self.row_blocks())
        if bad:
            raise EENNError(f"{source}: logits hold NaN or Inf values in {bad} of {n} samples.")
        if self.labels.min() < 0 or self.labels.max() >= c:
            raise EENNError(
                f"{source}: labels must lie in [0, {c}), got [{int(self.labels.min())}, {int(self.labels.max())}]."
            )
        if not torch.isfinite(self.costs).all() or (self.costs <= 0).any():
            raise EENNError(f"{source}: costs must be finite and positive, got {self.costs.tolist()}.")
        if (self.costs[1:] < self.costs[:-1]).any():
            raise EENNError(f"{source}: costs must not decrease with the exit index, got {self.costs.tolist()}.")
        tables = [
            ("head_costs", self.head_costs),
            *[(f"cost_table.{u}", v) for u, v in self.cost_table.items()],
            *[(f"head_cost_table.{u}", v) for u, v in self.head_cost_table.items()],
        ]
        for name, vec in tables:
            if vec is not None and tuple(vec.shape) != (k,):
                raise EENNError(f"{source}: {name} must have shape ({k},), got {tuple(vec.shape)}.")
            if vec is not None and (not torch.isfinite(vec).all() or (vec < 0).any()):
                raise EENNError(f"{source}: {name} must be finite and non-negative, got {vec.tolist()}.")
        if len(self.exit_names) != k:
            raise EENNError(f"{source}: {len(self.exit_names)} exit names for {k} exits.")
        if len(self.class_names) != c:
            raise EENNError(f"{source}: {len(self.class_names)} class names for {c} classes.")

    def save(self, path: str | os.PathLike) -> Path:
        self.validate(str(path))
        tensors = {"logits": self.logits, "labels": self.labels, "costs": self.costs}
        tensors.update({f"cost_table.{u}": v for u, v in self.cost_table.items()})
        tensors.update({f"head_cost_table.{u}": v for u, v in self.head_cost_table.items()})
        if self.head_costs is not None:
            tensors["head_costs"] = self.head_costs
        metadata = {
            "format": FORMAT,
            "cost_unit": self.cost_unit,
            "exit_names": json.dumps(self.exit_names),
            "class_names": json.dumps(self.class_names),
            "split": self.split,
            "source_run": self.source_run,
        }
        return write_safetensors(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Predictions:
        tensors, metadata, mapping = map_safetensors(path, "predictions file")
        if metadata.get("format") != FORMAT:
            raise EENNError(
                f"predictions file {str(path)!r} has format {metadata.get('format')!r}, expected {FORMAT!r}."
            )
        missing = [k for k in ("logits", "labels", "costs") if k not in tensors]
        if missing:
            raise EENNError(f"predictions file {str(path)!r} lacks the tensors {missing}.")
        if tensors["labels"].is_floating_point() or tensors["labels"].dtype == torch.bool:
            raise EENNError(
                f"predictions file {str(path)!r} has {tensors['labels'].dtype} labels, expected int64 class indices."
            )
        try:
            exit_names = json.loads(metadata.get("exit_names", "[]"))
            class_names = json.loads(metadata.get("class_names", "[]"))
        except json.JSONDecodeError:
            raise EENNError(f"predictions file {str(path)!r} has malformed exit_names/class_names metadata.") from None
        preds = cls(
            logits=tensors["logits"],
            labels=tensors["labels"],
            costs=tensors["costs"],
            cost_unit=metadata.get("cost_unit", "flops"),
            exit_names=exit_names,
            class_names=class_names,
            split=metadata.get("split", ""),
            source_run=metadata.get("source_run", ""),
            cost_table={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("cost_table.")},
            head_costs=tensors.get("head_costs"),
            head_cost_table={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("head_cost_table.")},
            mapping=mapping,
        )
        preds.validate(f"predictions file {str(path)!r}")
        return preds


def _address(mapping: mmap.mmap) -> int:
    """The address of a memory map's first byte."""
    return torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()


def _inside(tensor: torch.Tensor, mapping: mmap.mmap) -> bool:
    """Whether a contiguous tensor's bytes lie in the memory map."""
    start = tensor.data_ptr() - _address(mapping)
    return 0 <= start and start + tensor.numel() * tensor.element_size() <= len(mapping)


def check_compatible(val: Predictions, test: Predictions) -> None:
    """Validation and test predictions must come from the same model: same K, C and costs."""
    if val.num_exits != test.num_exits or val.num_classes != test.num_classes:
        raise EENNError(
            f"val and test predictions disagree: val has K={val.num_exits} exits and C={val.num_classes} "
            f"classes, test has K={test.num_exits} and C={test.num_classes}."
        )
    if not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(val.costs.tolist(), test.costs.tolist())):
        raise EENNError(
            f"val and test predictions have different per-exit costs: {val.costs.tolist()} vs {test.costs.tolist()}."
        )
