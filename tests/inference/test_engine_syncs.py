"""On a GPU the engine's decision path asks the device one thing per exit (the sizes of the next
gathers, in one read) and copies the results to the host once, at the end of a run. Checked on the
CPU with the GPU's code path (a stable sort where the CPU path calls ``nonzero``) under
:class:`eenn.utils.syncs.SyncCounter`, for every policy that runs online: the same exits, and
the syncs counted."""

from __future__ import annotations

import inspect

import pytest
import torch

import eenn.inference.engine as engine_mod
from eenn.inference.engine import EarlyExitEngine, batches_of
from eenn.inference.rebatch import Rebatcher
from eenn.utils.syncs import SyncCounter
from tests.inference.test_engine import ONLINE, RowCounter, _fitted

#: the result's copies to the host at the end of a run: ids, logits, heads, arrival times
END_OF_RUN = 4
#: the one read after an ``onward`` decision (how many carry on); other decisions read with ``tolist``
ONWARD_READ = "int @ eenn/inference/engine.py:" + str(
    next(i for i, line in enumerate(inspect.getsource(engine_mod).splitlines(), 1) if "int(exited.sum())" in line)
)


def gpu_first_true(mask: torch.Tensor, n: int) -> torch.Tensor:
    return torch.argsort((~mask).to(torch.uint8), stable=True)[:n]


@pytest.mark.parametrize("name", ONLINE)
def test_one_device_read_per_exit_with_the_gpu_path(setup, name, monkeypatch):
    policy = _fitted(setup, name)
    engine = EarlyExitEngine(setup.network, policy)
    batches = list(batches_of(setup.x, 64))
    expected = engine.run(batches)
    monkeypatch.setattr(engine_mod, "first_true", gpu_first_true)
    rows = RowCounter(setup.network)
    with SyncCounter() as syncs:
        got = engine.run(batches)
    rows.remove()
    assert torch.equal(got.exit_index, expected.exit_index) and torch.equal(got.logits, expected.logits)
    # one advance() per stage call; the last exit's advances ask the device nothing (everyone answers there)
    advances = sum(len(b) for b in got.stage_batch_sizes[:-1])
    reads = {k: v for k, v in syncs.where.items() if "engine.py" in k}
    # one read per early exit's advance, one more where no sample of a group evaluates its exit
    # (DEEx's jumps): nothing in the decision path, whatever the policy, and the end of the run
    assert sum(v for k, v in reads.items() if k.startswith("tolist")) + reads.get(ONWARD_READ, 0) == advances, reads
    if not policy.jumps:  # every decision onward: none reads with tolist
        assert not any(k.startswith("tolist") for k in reads), reads
    assert syncs.total - sum(reads.values()) == 0, dict(syncs.where)
    assert sum(v for k, v in reads.items() if k.startswith("cpu")) == END_OF_RUN, reads


def test_rebatching_with_the_gpu_path_gives_the_same_exits(setup, monkeypatch):
    policy = _fitted(setup, "maxprob")
    engine = EarlyExitEngine(setup.network, policy)
    batches = list(batches_of(setup.x, 32))
    expected = Rebatcher(engine, 32).run(batches)
    monkeypatch.setattr(engine_mod, "first_true", gpu_first_true)
    got = Rebatcher(engine, 32).run(batches)
    assert torch.equal(got.exit_index, expected.exit_index) and torch.equal(
        got.heads_evaluated, expected.heads_evaluated
    )
