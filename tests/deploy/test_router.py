"""Every online policy has a numpy router that decides as the policy does, sample for sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eenn.deploy.router import ROUTERS, build_router
from eenn.policies import POLICIES, build_policy, policy_class
from eenn.policies.synthetic import synthetic_predictions

ONLINE = [name for name in POLICIES.names() if policy_class(name).online]
CASES = [(name, i) for name in ONLINE for i in range(len(policy_class(name).examples))]


def fitted(name: str, example: int, temperature: bool):
    val = synthetic_predictions(600, num_exits=4, num_classes=7, seed=1)
    cls = policy_class(name)
    policy = build_policy(name, **cls.examples[example])
    budget = None
    if cls.budgeted:  # halfway between the cheapest schedule it can take and the full network
        cheapest = policy.cheapest_cost(val, "flops")
        budget = cheapest + 0.5 * (float(val.costs[-1]) - cheapest)
    T = torch.tensor([1.7, 0.8, 1.2, 1.0]) if temperature else None
    return policy.fit(val, budget, "flops", temperature=T)


def walk_both(policy, router, logits: torch.Tensor) -> tuple[int, int]:
    """Walk exits 0..K-1 as the engine does, each decision made by both on the same subset;
    assert they agree on every sample's exit, next exit and state. Returns (samples, exits taken early)."""
    n, K, _ = logits.shape
    state_t, state_n = policy.init_state(n), router.init_state(n)
    next_exit = torch.zeros(n, dtype=torch.int64)
    exits = torch.full((n,), -1, dtype=torch.int64)
    for k in range(K):
        idx = (next_exit == k).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        sub_t = {name: v.index_select(0, idx) for name, v in state_t.items()}
        sub_n = {name: v[idx.numpy()] for name, v in state_n.items()}
        lk = logits[:, k].index_select(0, idx)
        d_t = policy.decide(k, lk, sub_t)
        d_n = router.decide(k, lk.numpy(), sub_n)
        np.testing.assert_array_equal(d_n.exit, d_t.exit.numpy(), err_msg=f"{policy.name}: exit at {k}")
        np.testing.assert_array_equal(d_n.next_exit, d_t.next_exit.numpy(), err_msg=f"{policy.name}: next exit at {k}")
        assert d_n.state.keys() == d_t.state.keys()
        for key in d_t.state:  # float state (EENet's scores) may differ in the last bit: numpy sums in another order
            np.testing.assert_allclose(d_n.state[key], d_t.state[key].numpy(), rtol=0, atol=1e-6,
                                       err_msg=f"{policy.name}: state {key}")
        next_exit[idx] = d_t.next_exit
        exits[idx[d_t.exit]] = k
        for key in state_t:
            state_t[key][idx] = d_t.state[key]
            state_n[key][idx.numpy()] = d_n.state[key]
    assert bool((exits >= 0).all())
    return n, int((exits < K - 1).sum())


@pytest.mark.parametrize("temperature", [False, True], ids=["raw", "calibrated"])
@pytest.mark.parametrize(("name", "example"), CASES)
def test_router_decides_as_the_policy_on_every_sample(name, example, temperature):
    policy = fitted(name, example, temperature)
    params, arrays = ROUTERS[name].export(policy)
    router = build_router(name, policy.num_exits, policy.num_classes, params, arrays)
    test = synthetic_predictions(2000, num_exits=4, num_classes=7, seed=2, split="test")
    n, early = walk_both(policy, router, test.logits)
    if not policy_class(name).per_exit_only and policy.info.get("threshold", 0) is not None:
        assert 0 < early < n, "the test needs samples leaving early and samples going on"


def test_every_online_policy_has_a_router_and_the_oracles_none():
    assert sorted(ROUTERS) == sorted(ONLINE)


def test_a_bad_parameter_is_refused_by_name():
    policy = fitted("maxprob", 0, False)
    params, arrays = ROUTERS["maxprob"].export(policy)
    with pytest.raises(ValueError, match="'thresholds'"):
        build_router("maxprob", 4, 7, params, {"thresholds": arrays["thresholds"][:2]})
    with pytest.raises(ValueError, match="no runtime router for policy 'oracle'"):
        build_router("oracle", 4, 7, {}, {})
