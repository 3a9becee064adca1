"""Every online policy's decision exports into an ONNX graph (its own ``decide``, traced) and takes
the policy's decision in ONNX Runtime on every sample, at every exit, with its state handed on
from graph to graph as the runtime hands it; the oracles are refused by name."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from eenn.deploy.export import _Decision, _export_graph, _Part, check_exportable, state_names
from eenn.errors import EENNError
from eenn.policies import POLICIES, build_policy, policy_class
from eenn.policies.synthetic import synthetic_predictions

ONLINE = [name for name in POLICIES.names() if policy_class(name).online]
ORACLES = [name for name in POLICIES.names() if not policy_class(name).online]
# every online policy's examples, calibrated (the temperature is divided in the graph); maxprob raw too
CASES = [(name, i, True) for name in ONLINE for i in range(len(policy_class(name).examples))] + [("maxprob", 0, False)]
K, C = 4, 7


def fitted(name: str, example: int, temperature: bool):
    val = synthetic_predictions(600, num_exits=K, num_classes=C, seed=1)
    cls = policy_class(name)
    policy = build_policy(name, **cls.examples[example])
    budget = None
    if cls.budgeted:  # halfway between the cheapest schedule it can take and the full network
        cheapest = policy.cheapest_cost(val, "flops")
        budget = cheapest + 0.5 * (float(val.costs[-1]) - cheapest)
    T = torch.tensor([1.7, 0.8, 1.2, 1.0]) if temperature else None
    return policy.fit(val, budget, "flops", temperature=T)


def decision_graphs(policy, tmp_path) -> list[ort.InferenceSession]:
    """Exits 0..K-2's decisions as graphs: logits (and state) in, logits, exit, ... out."""
    example = synthetic_predictions(16, num_exits=K, num_classes=C, seed=3).logits
    state = policy.init_state(16)
    sessions = []
    for k in range(K - 1):
        d = _Decision(policy, k)
        args = (example[:, k], tuple(state[n] for n in d.state_names)) if k and d.state_names else (example[:, k],)
        path = tmp_path / f"decision_{k}.onnx"
        _export_graph(
            _Part(None, nn.Identity(), False, d),
            args,
            path,
            ["logits_in"] + d.input_names(),
            ["logits"] + d.output_names(),
            18,
        )
        sessions.append(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
        state = policy.decide(k, example[:, k], state).state
    return sessions


@pytest.mark.parametrize(
    ("name", "example", "temperature"), CASES, ids=[f"{n}{i}-{'calibrated' if t else 'raw'}" for n, i, t in CASES]
)
def test_the_exported_decision_is_the_policys_on_every_sample(name, example, temperature, tmp_path):
    policy = fitted(name, example, temperature)
    sessions = decision_graphs(policy, tmp_path)
    names = state_names(policy)
    logits = synthetic_predictions(2000, num_exits=K, num_classes=C, seed=2, split="test").logits
    n = logits.shape[0]
    state = policy.init_state(n)
    next_exit = torch.zeros(n, dtype=torch.int64)
    exits = torch.full((n,), -1, dtype=torch.int64)
    differ = 0
    for k in range(K):
        idx = (next_exit == k).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        sub = {key: v.index_select(0, idx) for key, v in state.items()}
        lk = logits[:, k].index_select(0, idx)
        d = policy.decide(k, lk, sub)
        if k < K - 1:  # the last exit answers for everyone: its segment holds no decision
            feeds = {"logits_in": lk.numpy(), **({f"state_in_{m}": sub[m].numpy() for m in names} if k else {})}
            got = dict(zip([o.name for o in sessions[k].get_outputs()], sessions[k].run(None, feeds)))
            # ONNX Runtime's float rounding may tip a score lying on its threshold: counted, and rare
            differ += int((got["exit"] != d.exit.numpy()).sum())
            same = got["exit"] == d.exit.numpy()
            if policy.jumps:
                np.testing.assert_array_equal(got["next_exit"][same], d.next_exit.numpy()[same])
            for m in names:
                want = d.state[m].numpy()[same]
                np.testing.assert_allclose(got[f"state_out_{m}"][same], want, rtol=0, atol=1e-5, err_msg=f"state {m}")
        next_exit[idx] = d.next_exit
        exits[idx[d.exit]] = k
        for key in state:
            state[key][idx] = d.state[key]
    assert bool((exits >= 0).all())
    assert differ <= 2, f"{differ} of {n} decisions differ in ONNX Runtime"
    if not policy_class(name).per_exit_only and policy.info.get("threshold", 0) is not None:
        assert len(exits.unique()) >= 2, "the test needs samples leaving at different exits"


@pytest.mark.parametrize("name", ORACLES)
def test_an_oracle_is_refused_by_name(name):
    val = synthetic_predictions(200, num_exits=K, num_classes=C, seed=1)
    cls = policy_class(name)
    policy = build_policy(name, **cls.examples[0]).fit(val, float(val.costs[-1]) if cls.budgeted else None, "flops")
    with pytest.raises(EENNError, match=f"policy '{name}' reads the labels"):
        check_exportable(policy, type("Net", (), {"num_exits": K})())
