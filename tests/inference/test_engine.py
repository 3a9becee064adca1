"""The engine reproduces offline simulation exactly, skips what it should, and rebatching changes nothing."""

from __future__ import annotations

import pytest
import torch

import eenn.inference.rebatch as rebatch_mod
from eenn.errors import EENNError
from eenn.inference.engine import EarlyExitEngine, batches_of, single_samples
from eenn.inference.rebatch import Rebatcher
from eenn.policies import POLICIES, build_policy, policy_class
from eenn.policies.base import Decision, ExitPolicy, continue_to_next
from eenn.policies.simulate import realised_cost, simulate

# every policy that runs online, fitted to this fraction of the full cost where it takes a budget
ONLINE = [name for name in POLICIES.names() if policy_class(name).online]
BUDGET = 0.8


def _fit(setup, name, hparams, budget):
    full = setup.profile.exits[-1].flops
    return build_policy(name, **hparams).fit(setup.val, None if budget is None else budget * full, "flops")


_FITTED = {}


def _fitted(setup, name):
    """Fitted with its first example once per session (deciding never changes a policy)."""
    if name not in _FITTED:
        cls = policy_class(name)
        _FITTED[name] = _fit(setup, name, cls.examples[0], BUDGET if cls.budgeted else None)
    return _FITTED[name]


class RowCounter:
    """How many samples each stage and head of the network computed, and whether every call ran
    under ``torch.inference_mode()``."""

    def __init__(self, network):
        K = network.num_exits
        self.stages, self.heads = [0] * K, [0] * K
        self.modes: set[bool] = set()
        self.hooks = [m.register_forward_hook(self._count(self.stages, k)) for k, m in enumerate(network.stages)]
        self.hooks += [m.register_forward_hook(self._count(self.heads, k)) for k, m in enumerate(network.heads)]

    def _count(self, store, k):
        def hook(module, args, output):
            store[k] += args[0].shape[0]
            self.modes.add(torch.is_inference_mode_enabled())

        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


@pytest.mark.parametrize("name", ONLINE)
def test_engine_matches_offline_simulation_and_computes_only_what_it_must(setup, name):
    policy = _fitted(setup, name)
    exit_idx, heads = simulate(policy, setup.test.logits)
    if not policy.per_exit_only:  # a per-exit policy sends everyone to one exit
        assert exit_idx.unique().numel() >= 2, "the test needs a mix of exits"

    engine = EarlyExitEngine(setup.network, policy)
    counter = RowCounter(setup.network)
    try:
        out = engine.run(batches_of(setup.x, 64, setup.test.labels))
    finally:
        counter.remove()

    n = setup.x.shape[0]
    assert torch.equal(out.exit_index, exit_idx)
    assert torch.equal(out.heads_evaluated, heads)
    assert torch.equal(out.predictions, setup.test.logits[torch.arange(n), exit_idx].argmax(-1))
    torch.testing.assert_close(out.logits, setup.test.logits[torch.arange(n), exit_idx], rtol=1e-4, atol=1e-4)
    assert out.accuracy() == pytest.approx(float((out.predictions == setup.test.labels).double().mean()))
    # layers really skipped: stage k ran on the samples answering at k or later, head k only on those that evaluated it
    assert counter.stages == [int((exit_idx >= k).sum()) for k in range(3)]
    assert counter.heads == heads.sum(0).tolist()
    assert counter.modes == {True}  # under torch.inference_mode()
    costs, head_costs = setup.test.costs, setup.test.head_costs
    torch.testing.assert_close(out.cost(setup.profile, "flops"), realised_cost(exit_idx, heads, costs, head_costs))
    assert (out.latency_ms > 0).all() and out.wall_s > 0 and out.policy_s > 0


@pytest.mark.parametrize("name", [n for n in ONLINE if not policy_class(n).per_exit_only])
def test_rebatching_and_single_sample_mode_give_the_engine_results_in_input_order(setup, name):
    engine = EarlyExitEngine(setup.network, _fitted(setup, name))
    plain = engine.run(batches_of(setup.x, 48))
    assert plain.exit_index.unique().numel() >= 2, "the test needs samples leaving at different exits"
    counter = RowCounter(setup.network)
    try:
        for batch_size in (64, 7):
            re = Rebatcher(engine, batch_size).run(batches_of(setup.x, 48, setup.test.labels))
            assert torch.equal(re.exit_index, plain.exit_index)
            assert torch.equal(re.predictions, plain.predictions)
            assert torch.equal(re.heads_evaluated, plain.heads_evaluated)
            torch.testing.assert_close(re.logits, plain.logits, rtol=1e-4, atol=1e-4)
            assert torch.equal(re.labels, setup.test.labels)
            # deeper stages run full batches; only the end-of-stream flush may be partial
            for sizes in re.stage_batch_sizes:
                assert sizes and all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
            assert [sum(sizes) for sizes in re.stage_batch_sizes] == [
                int((plain.exit_index >= k).sum()) for k in range(3)
            ]
    finally:
        counter.remove()
    assert counter.modes == {True}
    assert counter.stages == [2 * int((plain.exit_index >= k).sum()) for k in range(3)]  # each sample once per run

    single = engine.run(single_samples(setup.x[:40]))
    assert torch.equal(single.exit_index, plain.exit_index[:40])
    assert torch.equal(single.predictions, plain.predictions[:40])
    assert all(
        sizes == [1] * int((plain.exit_index[:40] >= k).sum()) for k, sizes in enumerate(single.stage_batch_sizes)
    )
    # per-request latency: each request's own time, not the time since the stream began
    assert single.latency_ms.sum() <= 1e3 * single.wall_s


class _PlannedJumps(ExitPolicy):
    """Sample i of the stream follows ``plan[i]``: 0 exits at exit 0, 1 at exit 1, 2 goes through
    exit 1 to exit 2, 3 jumps from exit 0 to exit 2. Exit 0 decides with a next_exit, exit 1 onward."""

    jumps = True

    def __init__(self, plan):
        super().__init__()
        self.plan, self.cursor, self.num_exits, self.num_classes = plan, 0, 3, 10

    def init_state(self, n):
        self.cursor += n
        return {"plan": self.plan[self.cursor - n : self.cursor]}

    def _decide(self, k, logits_k, state):
        plan = state["plan"]
        if k == 0:
            return Decision(plan == 0, torch.where(plan == 3, 2, 1), state)
        return continue_to_next(k, plan == 1, state)


def test_rebatching_mixes_groups_with_and_without_a_next_exit_tensor(setup, monkeypatch):
    """After an onward decision a group carries no next_exit (all go on to the next exit); a queue
    that gathers such groups with ones whose samples jumped spells theirs out."""
    plan = torch.multinomial(
        torch.tensor([0.3, 0.2, 0.35, 0.15]), setup.x.shape[0], True, generator=torch.Generator().manual_seed(0)
    )
    policy = _PlannedJumps(plan)
    expected_exit = torch.where(plan == 3, 2, plan)
    gathered = []
    gather = rebatch_mod._gather
    monkeypatch.setattr(
        rebatch_mod,
        "_gather",
        lambda pieces, k: gathered.append({g.next_exit is None for g, _ in pieces}) or gather(pieces, k),
    )
    engine = EarlyExitEngine(setup.network, policy)
    plain = engine.run(batches_of(setup.x, 4))
    assert torch.equal(plain.exit_index, expected_exit)
    for batch_size in (7, 64):
        policy.cursor = 0
        re = Rebatcher(engine, batch_size).run(batches_of(setup.x, 4))
        assert torch.equal(re.exit_index, expected_exit) and torch.equal(re.heads_evaluated, plain.heads_evaluated)
        torch.testing.assert_close(re.logits, plain.logits, rtol=1e-4, atol=1e-4)
    assert not plain.heads_evaluated[plan == 3, 1].any() and plain.heads_evaluated[plan == 2].all()
    assert {True, False} in gathered  # the case this test is about happened


def test_decisions_run_on_one_thread_and_the_thread_count_is_restored(setup):
    """Policy decisions work on tiny tensors; a thread team forked per op there only costs time."""
    policy = _fit(setup, "maxprob", {}, 0.6)
    seen = []
    decide = policy.decide

    def spy(k, logits, state):
        seen.append(torch.get_num_threads())
        return decide(k, logits, state)

    policy.decide = spy
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = EarlyExitEngine(setup.network, policy)
        stage_threads = []
        hook = setup.network.stages[1].register_forward_pre_hook(
            lambda m, a: stage_threads.append(torch.get_num_threads())
        )
        try:
            out = engine.run(batches_of(setup.x[:16], 8))
        finally:
            hook.remove()
        assert seen and set(seen) == {1}
        assert stage_threads and set(stage_threads) == {2}  # the network keeps its threads
        assert torch.get_num_threads() == 2
        assert out.policy_s > 0
    finally:
        torch.set_num_threads(before)


def test_deex_offloaded_samples_jump_to_the_backbone_without_the_heads_in_between(setup):
    policy = _fit(setup, "deex", {"p_tar": 0.12}, 0.8)
    out = EarlyExitEngine(setup.network, policy).run([setup.x])
    offloaded = out.exit_index == 2
    assert offloaded.any() and (~offloaded).any()
    assert not out.heads_evaluated[offloaded, 1].any()
    assert out.heads_evaluated[offloaded][:, [0, 2]].all()


def test_engine_refuses_unfitted_mismatched_and_offline_only_policies(setup):
    with pytest.raises(EENNError, match="not fitted"):
        EarlyExitEngine(setup.network, build_policy("maxprob"))
    oracle = build_policy("oracle").fit(setup.val, None, "flops")
    with pytest.raises(EENNError, match="oracle"):
        EarlyExitEngine(setup.network, oracle)
    two = _fit(setup, "maxprob", {}, 0.6)
    two.num_exits = 2
    with pytest.raises(EENNError, match="2 exits"):
        EarlyExitEngine(setup.network, two)
    with pytest.raises(EENNError, match="empty"):
        EarlyExitEngine(setup.network, _fit(setup, "maxprob", {}, 0.6)).run([])
