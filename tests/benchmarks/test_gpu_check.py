"""benchmarks/gpu_check.py's tie check: the samples whose engine exit may differ from the offline one
by float differences of the logits alone, and the per-sample comparison that lets only those
differ; and its --quick run on the CPU, where the engine must agree exactly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eenn.policies.maxprob import MaxProbPolicy

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from gpu_check import compare_exits, near_ties  # noqa: E402


def logits_with_max_prob(rows: list[list[float]]) -> torch.Tensor:
    """(N, K, 4) logits whose max softmax probability at exit k is rows[n][k]."""
    out = torch.empty(len(rows), len(rows[0]), 4)
    for n, row in enumerate(rows):
        for k, p in enumerate(row):
            rest = (1 - p) / 3
            out[n, k] = torch.tensor([p, rest, rest, rest]).log()
    return out


def maxprob(thresholds: list[float]) -> MaxProbPolicy:
    policy = MaxProbPolicy()
    policy.num_exits, policy.num_classes = len(thresholds), 4
    policy.thresholds = torch.tensor(thresholds)
    return policy


def test_near_ties_marks_only_scores_close_to_a_threshold_the_sample_reaches():
    policy = maxprob([0.5, 0.6, -math.inf])
    logits = logits_with_max_prob(
        [
            [0.5005, 0.30, 0.3],  # exits at 0, 5e-4 above its threshold: a tie
            [0.40, 0.5999, 0.3],  # passes exit 0 clearly, 1e-4 below exit 1's threshold: a tie
            [0.90, 0.6000, 0.3],  # exits at 0 clearly; its tie at exit 1 is never reached
            [0.40, 0.40, 0.3],  # every decision clear; the last exit always answers
        ]
    )
    assert near_ties(policy, logits, 1e-3).tolist() == [True, True, False, False]
    assert near_ties(policy, logits, 3e-4).tolist() == [False, True, False, False]  # only the second lies within 3e-4
    assert not near_ties(policy, logits, 1e-6).any()


def test_near_ties_scales_logits_by_the_fitted_temperature_as_decide_does():
    policy = maxprob([0.5, 0.6, -math.inf])
    logits = logits_with_max_prob([[0.5005, 0.3, 0.3]])
    assert near_ties(policy, logits, 1e-3).tolist() == [True]
    policy.temperature = torch.tensor([0.5, 1.0, 1.0])  # sharper at exit 0: far above 0.5 now
    assert near_ties(policy, logits, 1e-3).tolist() == [False]


def test_only_disagreements_at_near_ties_pass_however_many_ties_there_are():
    offline = torch.tensor([0, 1, 2, 0, 1])
    ties = torch.tensor([True, True, False, False, False])
    same = compare_exits(offline.clone(), offline, ties)
    assert (
        same["engine_equals_offline"] and same["engine_equals_offline_up_to_ties"] and same["exit_disagreements"] == 0
    )
    at_ties = compare_exits(torch.tensor([1, 2, 2, 0, 1]), offline, ties)  # samples 0 and 1 moved, both ties
    assert not at_ties["engine_equals_offline"] and at_ties["engine_equals_offline_up_to_ties"]
    assert (at_ties["exit_disagreements"], at_ties["disagreements_outside_ties"]) == (2, 0)
    # one disagreement, two ties: a count comparison passes it, but sample 3 is not a tie
    elsewhere = compare_exits(torch.tensor([0, 1, 2, 2, 1]), offline, ties)
    assert elsewhere["exit_disagreements"] <= elsewhere["near_ties"]
    assert not elsewhere["engine_equals_offline_up_to_ties"]
    assert elsewhere["disagreements_outside_ties"] == 1 and elsewhere["disagreeing_samples_outside_ties"] == [3]


@pytest.mark.slow
def test_the_quick_run_checks_the_engine_per_sample_on_the_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("with CUDA the quick run checks the GPU, where near ties may move")
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(BENCHMARKS.parent)}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--quick", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["infer"]["device"] == "cpu"
    # on the CPU the engine reproduces the offline simulation exactly, sample by sample
    assert result["engine_equals_offline"] and result["exit_disagreements"] == 0
