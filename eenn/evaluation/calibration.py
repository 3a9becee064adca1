"""Per-exit temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017)
and the expected calibration error and reliability diagram that measure it.

Temperature scaling divides exit k's logits by one scalar T_k > 0 fitted to minimise the
negative log-likelihood on validation; it never changes a prediction (argmax), only the
confidence the policies read.

Fitted on the data a policy is then calibrated on, the temperatures make the policy's candidate
rules depend on that data. A policy that certifies a risk (Learn then Test) needs rules fixed
before its calibration data is seen, so :func:`temperature_split` gives the temperatures a part
of validation of their own.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from eenn.errors import EENNError
from eenn.predictions import Predictions

#: the search range of log T: T from 1/400 to 400, far beyond what any trained exit needs
LOG_T_SPAN = 6.0
BINS = 15


def _nll(logits: torch.Tensor, labels: torch.Tensor, log_t: float) -> float:
    return float(torch.nn.functional.cross_entropy(logits / math.exp(log_t), labels))


def fit_temperatures(preds: Predictions) -> torch.Tensor:
    """T_k (K,) float32 minimising exit k's NLL on ``preds``. The NLL is convex in 1/T, hence
    unimodal in log T, so a bounded Brent search finds the minimum."""
    from scipy.optimize import minimize_scalar  # about a second to import: only calibrate=true needs it

    temps = []
    for k in range(preds.num_exits):
        z = preds.logits[:, k].double()
        res = minimize_scalar(
            lambda s, z=z: _nll(z, preds.labels, s),
            bounds=(-LOG_T_SPAN, LOG_T_SPAN),
            method="bounded",
            options={"xatol": 1e-4},
        )
        temps.append(math.exp(float(res.x)))
    return torch.tensor(temps, dtype=torch.float32)


def temperature_rows(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint random rows of ``n`` samples: ``round(fraction n)`` for fitting the temperatures,
    the rest for calibrating the policy, drawn from ``seed`` (the same rows for the same n, fraction
    and seed), each part in ascending order."""
    n_temp = round(fraction * n)
    if not 0 < n_temp < n:
        raise EENNError(
            f"calibrate_split={fraction} leaves one part of the {n} validation samples empty; "
            f"it must keep at least one sample for the temperatures and one for the policy."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    # file order within each part: the policy then sees its samples as the file holds them
    return perm[:n_temp].sort().values, perm[n_temp:].sort().values


def temperature_split(
    preds: Predictions, fraction: float, seed: int
) -> tuple[Predictions, Predictions, dict[str, Any]]:
    """``preds`` split by :func:`temperature_rows` into the temperatures' part and the policy's,
    with a record of the split for the fit's metrics."""
    temp_rows, cal_rows = temperature_rows(preds.num_samples, fraction, seed)
    info = {
        "temperature_fraction": fraction,
        "seed": seed,
        "temperature_samples": len(temp_rows),
        "calibration_samples": len(cal_rows),
    }
    return preds.select(temp_rows), preds.select(cal_rows), info


def reliability(logits: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> dict[str, list[float]]:
    """Equal-width bins of the max probability of logits (N, C): per bin the sample count, the
    mean confidence and the accuracy (NaN in an empty bin)."""
    conf, pred = torch.softmax(logits.double(), -1).max(-1)
    right = (pred == labels).double()
    b = torch.clamp((conf * bins).long(), max=bins - 1)
    count = torch.bincount(b, minlength=bins).double()
    mean_conf = torch.bincount(b, conf, minlength=bins) / count
    acc = torch.bincount(b, right, minlength=bins) / count
    return {"count": count.tolist(), "confidence": mean_conf.tolist(), "accuracy": acc.tolist()}


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over equal-width confidence bins."""
    r = reliability(logits, labels, bins)
    n = sum(r["count"])
    return sum(c / n * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"]) if c)


def calibration_report(temperature: torch.Tensor, splits: dict[str, Predictions]) -> dict[str, Any]:
    """The fitted temperatures and, per split, each exit's ECE before and after scaling."""
    out: dict[str, Any] = {"temperatures": temperature.tolist(), "bins": BINS}
    for name, preds in splits.items():
        out[name] = {
            "ece_before": [
                expected_calibration_error(preds.logits[:, k], preds.labels) for k in range(preds.num_exits)
            ],
            "ece_after": [
                expected_calibration_error(preds.logits[:, k] / temperature[k], preds.labels)
                for k in range(preds.num_exits)
            ],
        }
    return out
