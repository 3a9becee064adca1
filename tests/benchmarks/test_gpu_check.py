"""benchmarks/gpu_check.py's tie count: the samples whose engine exit may differ from the offline one
by float differences of the logits alone (CPU: the check itself only runs on a GPU)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from eenn.policies.maxprob import MaxProbPolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from gpu_check import near_ties  # noqa: E402


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


def test_near_ties_counts_only_scores_close_to_a_threshold_the_sample_reaches():
    policy = maxprob([0.5, 0.6, -math.inf])
    logits = logits_with_max_prob([
        [0.5005, 0.30, 0.3],  # exits at 0, 5e-4 above its threshold: a tie
        [0.40, 0.5999, 0.3],  # passes exit 0 clearly, 1e-4 below exit 1's threshold: a tie
        [0.90, 0.6000, 0.3],  # exits at 0 clearly; its tie at exit 1 is never reached
        [0.40, 0.40, 0.3],  # every decision clear; the last exit always answers
    ])
    assert near_ties(policy, logits, 1e-3) == 2
    assert near_ties(policy, logits, 3e-4) == 1  # only the second lies within 3e-4
    assert near_ties(policy, logits, 1e-6) == 0


def test_near_ties_scales_logits_by_the_fitted_temperature_as_decide_does():
    policy = maxprob([0.5, 0.6, -math.inf])
    logits = logits_with_max_prob([[0.5005, 0.3, 0.3]])
    assert near_ties(policy, logits, 1e-3) == 1
    policy.temperature = torch.tensor([0.5, 1.0, 1.0])  # sharper at exit 0: far above 0.5 now
    assert near_ties(policy, logits, 1e-3) == 0
