"""The engine on a vision transformer: compaction gathers (B, N, D) token batches, and eenn-infer
on a ViT run makes the offline simulation's decisions sample for sample."""

from __future__ import annotations

import pytest
import torch

from eenn.cost import profile_costs
from eenn.inference.engine import EarlyExitEngine, batches_of
from eenn.models import build_multi_exit
from eenn.policies import build_policy
from eenn.policies.simulate import simulate
from eenn.tasks.fit import fit_run
from eenn.tasks.infer import infer
from eenn.tasks.train import train
from tests.inference.conftest import SHAPE, briefly_trained, predictions
from tests.inference.test_engine import RowCounter
from tests.inference.test_infer_run import _compose

# a ViT the size of a unit test: width 32, 4 blocks; 4 x 4 patches + the class token = 17 tokens
TINY_VIT = {"name": "vit_tiny_patch16_224", "embed_dim": 32, "depth": 4, "num_heads": 2}


def test_the_engine_compacts_token_batches_and_matches_simulation():
    torch.manual_seed(0)
    net = briefly_trained(
        build_multi_exit(
            {**TINY_VIT, "img_size": 16, "patch_size": 4}, {"at": [1, 2, 3]}, num_classes=10, input_shape=SHAPE
        ),
        steps=40,
    )
    profile = profile_costs(net, SHAPE, latency=False)
    xv, xt = torch.randn(300, *SHAPE), torch.randn(200, *SHAPE)
    val, test = predictions(net, profile, xv, "val"), predictions(net, profile, xt, "test")
    policy = build_policy("maxprob").fit(val, 0.6 * profile.exits[-1].flops, "flops")
    exit_idx, heads = simulate(policy, test.logits)
    assert exit_idx.unique().numel() >= 3, "the test needs samples leaving at several exits"

    counter = RowCounter(net)
    try:
        out = EarlyExitEngine(net, policy).run(batches_of(xt, 64, test.labels))
    finally:
        counter.remove()
    assert torch.equal(out.exit_index, exit_idx) and torch.equal(out.heads_evaluated, heads)
    assert torch.equal(out.predictions, test.logits[torch.arange(len(xt)), exit_idx].argmax(-1))
    # block k ran on the (B, 17, 32) tokens of the samples still in, and on no others
    assert counter.stages == [int((exit_idx >= k).sum()) for k in range(4)]


@pytest.mark.parametrize("mode", ["batched", "rebatch"])
def test_eenn_infer_on_a_vit_run_equals_the_offline_simulation(tmp_path, mode):
    run, fit_dir = tmp_path / "train", tmp_path / "fit"
    vit = [f"+backbone.{k}={v}" for k, v in {**TINY_VIT, "img_size": 8, "patch_size": 2}.items() if k != "name"]
    train(
        _compose(
            "train",
            [
                "data=digits",
                "backbone=timm",
                f"backbone.name={TINY_VIT['name']}",
                *vit,
                "exits.at=[1,2,3]",
                "logger=csv",
                "trainer.max_epochs=1",
                "cost.repeats=2",
                "trainer.enable_progress_bar=false",
            ],
            tmp_path,
            run,
        )
    )
    fit_run(_compose("fit", [f"run_dir={run}", "policy=maxprob", "budget.fraction=0.6"], tmp_path, fit_dir), fit_dir)
    out = infer(
        _compose(
            "infer",
            [
                f"policy_dir={fit_dir}",
                f"mode={mode}",
                "batch_size=64",
                "edge_cloud.enabled=false",
                "timing_repeats=1",
                "threads=1",
            ],
            tmp_path,
            tmp_path / "infer",
        ),
        tmp_path / "infer",
    )
    assert out["num_samples"] == 360
    assert out["agreement"]["exit_index"] == 1.0 and out["agreement"]["predictions"] == 1.0
    assert out["accuracy"]["realised"] == out["accuracy"]["expected"]
    assert len([f for f in out["exit_fractions"]["realised"] if f > 0]) >= 2
