"""A bundle in ONNX Runtime takes the eager engine's exit for every sample, with its logits, on
ResNet-20 and ResNet-56, a timm CNN, a ViT and an MSDNet; the tie rule of the acceptance is checked
and counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eenn.cost import profile_costs
from eenn.deploy import Runtime
from eenn.deploy.export import export_bundle
from eenn.inference.engine import EarlyExitEngine, batches_of
from eenn.models import build_multi_exit
from eenn.policies import build_policy
from eenn.policies.features import max_prob
from tests.inference.conftest import SHAPE, briefly_trained, predictions
from tests.inference.test_vit_engine import TINY_VIT

NETWORKS = {
    "resnet20": ({"name": "cifar_resnet", "depth": 20}, {"at": "stages"}),
    "resnet56": ({"name": "cifar_resnet", "depth": 56}, {"at": "stages"}),
    "timm_cnn": ({"name": "resnet10t"}, {"at": "stages"}),
    "vit": ({**TINY_VIT, "img_size": 16, "patch_size": 4}, {"at": [1, 2, 3]}),
    # multi-scale features: a segment takes and hands on a list of maps (h_in_0, h_in_1, ...)
    "msdnet": (
        {"name": "msdnet", "n_blocks": 3, "channels": 4, "growth_rate": 2, "gr_factor": [1, 2], "bn_factor": [1, 2]},
        {"at": "stages", "head": {"name": "native"}},
    ),
}
SLOW = {"resnet56"}  # ResNet-20 is the same code with fewer blocks


def parity(net, tmp_path, policy_name: str = "maxprob", n_test: int = 400) -> dict[str, float]:
    """Export ``net`` with a policy fitted on its own validation logits; run the test inputs through
    the bundle and the engine; return the counts the acceptance asks for."""
    profile = profile_costs(net, SHAPE, latency=False)
    xv, xt = torch.randn(400, *SHAPE), torch.randn(n_test, *SHAPE)
    val, test = predictions(net, profile, xv, "val"), predictions(net, profile, xt, "test")
    policy = build_policy(policy_name).fit(val, 0.6 * profile.exits[-1].flops, "flops")
    bundle = export_bundle(net, policy, profile, xv[:32], tmp_path / "bundle", backbone=False)
    out = Runtime(bundle, threads=1).predict(xt.numpy(), batch_size=64)
    eager = EarlyExitEngine(net, policy).run(batches_of(xt, 64, test.labels))
    K = net.num_exits
    assert len(np.unique(eager.exit_index.numpy())) >= 2, "the test needs samples leaving at several exits"
    differ = np.flatnonzero(out.exits != eager.exit_index.numpy())
    # a sample may take another exit only through a tie: its score at the first exit where the two
    # disagree lies on that exit's threshold, within what ONNX Runtime's float differences move
    thresholds = policy.thresholds.numpy()
    for i in differ:
        k = int(min(out.exits[i], eager.exit_index[i]))
        with torch.inference_mode():
            logits = net(xt[i : i + 1])[:, k]
        assert abs(float(max_prob(logits)[0]) - thresholds[k]) < 1e-5, f"sample {i} differs at exit {k} without a tie"
    same = out.exits == eager.exit_index.numpy()
    np.testing.assert_allclose(out.logits[same], eager.logits.numpy()[same], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(out.heads[same], eager.heads_evaluated.numpy()[same])
    return {"samples": n_test, "ties": len(differ), "exits": K}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in NETWORKS])
def test_bundle_takes_the_engines_exit_for_every_sample(name, tmp_path):
    torch.manual_seed(0)
    backbone, exits = NETWORKS[name]
    net = briefly_trained(build_multi_exit(backbone, exits, num_classes=10, input_shape=SHAPE), steps=30).eval()
    counts = parity(net, tmp_path)
    assert counts["ties"] / counts["samples"] < 1e-3, counts
