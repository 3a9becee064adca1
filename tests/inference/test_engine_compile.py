"""The engine with compile=true (every stage and head through torch.compile, dynamic batch size)
takes the eager engine's exit for every sample but ties, batched and one sample at a time."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from eenn.cost import profile_costs
from eenn.inference.engine import EarlyExitEngine, batches_of, single_samples
from eenn.models import build_multi_exit
from eenn.policies import build_policy
from eenn.policies.features import max_prob
from tests.inference.conftest import SHAPE, briefly_trained, predictions


def _compare(depth: int) -> EarlyExitEngine:
    """Run a compiled and an eager engine on one briefly trained ResNet side by side; return the compiled one."""
    torch.manual_seed(0)
    net = briefly_trained(
        build_multi_exit({"name": "cifar_resnet", "depth": depth}, {"at": "stages"}, num_classes=10, input_shape=SHAPE),
        steps=30,
    ).eval()
    profile = profile_costs(net, SHAPE, latency=False)
    xv, xt = torch.randn(400, *SHAPE), torch.randn(300, *SHAPE)
    policy = build_policy("maxprob").fit(predictions(net, profile, xv, "val"), 0.6 * profile.exits[-1].flops, "flops")
    eager_engine, compiled_engine = EarlyExitEngine(net, policy), EarlyExitEngine(net, policy, compile=True)
    for stream in (lambda: batches_of(xt, 64), lambda: single_samples(xt[:20])):
        eager, compiled = eager_engine.run(stream()), compiled_engine.run(stream())
        assert len(eager.exit_index.unique()) >= 2, "the test needs samples leaving at several exits"
        # as in tests/deploy/test_parity.py: a sample may take another exit only through a tie, its
        # score at the first exit where the two disagree within float differences of the threshold
        differ = (eager.exit_index != compiled.exit_index).nonzero().flatten().tolist()
        for i in differ:
            k = int(min(eager.exit_index[i], compiled.exit_index[i]))
            with torch.inference_mode():
                score = float(max_prob(net(xt[i : i + 1])[:, k])[0])
            assert abs(score - float(policy.thresholds[k])) < 1e-5, f"sample {i} differs at exit {k} without a tie"
        assert len(differ) <= 1e-3 * eager.num_samples, differ
        same = eager.exit_index == compiled.exit_index
        torch.testing.assert_close(compiled.logits[same], eager.logits[same], rtol=0, atol=1e-4)
    return compiled_engine


@pytest.mark.slow
def test_compiled_engines_take_the_eager_engines_exits():
    counters.clear()
    # two engines in one process, as in benchmarks/inference_speed.py: dynamo's graph cache for
    # compiled modules is shared, so the second engine needs room beside the first one's graphs
    compiled = [_compare(depth) for depth in (8, 14)]
    assert not any(f.eager for e in compiled for f in [*e.stages, *e.heads]), "a segment fell back to eager"
    # every frame dynamo met was compiled: none given up at its recompile limit (which runs it eagerly)
    assert counters["frames"]["total"] == counters["frames"]["ok"], dict(counters["frames"])
