"""Uncertainty of a comparison over seeds: summaries with a t confidence interval, the paired
difference of two methods run on the same seeds (t interval, t-test and an exact sign-flip test),
the unpaired (Welch) difference, and the smallest effect a study of that size could have seen.

A seed fixes what both methods share (the validation split, the training subset and order, the
initialisation stream), so the difference per seed cancels that shared noise: pair by seed
whenever both methods have the seed. With few seeds the t interval is the one to read; the
sign-flip test makes no normality assumption but cannot go below 2 / 2^n (0.0625 for 5 seeds).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
NO_SPREAD = "1 seed: no spread"
NO_DIFFERENCE = "no detectable difference"


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation, n and the two-sided t interval of the mean (None for n = 1)."""

    mean: float
    std: float | None
    n: int
    ci_low: float | None
    ci_high: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)

    @property
    def label(self) -> str:
        """``mean ± half-width`` (or the single seed's value, labelled)."""
        if self.ci_low is None or self.ci_high is None:
            return f"{self.mean:.4g} ({NO_SPREAD})"
        return f"{self.mean:.4g} ± {(self.ci_high - self.ci_low) / 2:.2g}"


@dataclass(frozen=True)
class Difference:
    """A - B: its mean, t interval, two-sided p-values and the smallest effect the study could
    detect (80 % power at the 5 % level, at the observed spread); ``paired`` says how it was formed."""

    mean: float
    ci_low: float | None
    ci_high: float | None
    n: int
    p_t: float | None
    p_sign_flip: float | None
    detectable: float | None
    paired: bool

    def as_dict(self) -> dict[str, float | int | bool | None]:
        return asdict(self)

    @property
    def verdict(self) -> str:
        """What the interval says: a sign, or that the study cannot tell (or has one seed)."""
        if self.ci_low is None or self.ci_high is None:
            return NO_SPREAD
        if self.ci_low <= 0 <= self.ci_high:
            return NO_DIFFERENCE
        return "higher" if self.mean > 0 else "lower"

    @property
    def label(self) -> str:
        if self.ci_low is None or self.ci_high is None:
            return f"{self.mean:+.4g} ({NO_SPREAD})"
        text = f"{self.mean:+.4g} [{self.ci_low:+.4g}, {self.ci_high:+.4g}]"
        if self.verdict == NO_DIFFERENCE:
            text += f", {NO_DIFFERENCE}"
            if self.detectable is not None:
                text += f" (detectable: ±{self.detectable:.2g})"
        return text


def _t(n: int, level: float = LEVEL) -> float:
    return float(sps.t.ppf(0.5 + level / 2, n - 1))


def summarise(values: Sequence[float], level: float = LEVEL) -> Summary:
    """The mean of ``values`` (one per seed) with its t interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to summarise")
    if x.size == 1:
        return Summary(float(x[0]), None, 1, None, None)
    sd = float(x.std(ddof=1))
    half = _t(x.size, level) * sd / math.sqrt(x.size)
    return Summary(float(x.mean()), sd, int(x.size), float(x.mean() - half), float(x.mean() + half))


def sign_flip_p(d: Sequence[float], exact_up_to: int = 16, draws: int = 100_000, seed: int = 0) -> float:
    """Two-sided p of the mean paired difference under sign symmetry (H0: no difference): the
    share of sign patterns whose |mean| is at least the observed one; exact up to ``exact_up_to``
    pairs, Monte Carlo (counting the observed pattern) beyond."""
    x = np.asarray(d, dtype=np.float64)
    observed = abs(x.mean())
    tol = 1e-12 * max(1.0, float(np.abs(x).max(initial=0.0)))
    if x.size <= exact_up_to:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=x.size)))
        return float(np.mean(np.abs(signs @ x) / x.size >= observed - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(draws, x.size))
    return float((np.sum(np.abs(signs @ x) / x.size >= observed - tol) + 1) / (draws + 1))


def detectable_effect(sd: float, n: int, level: float = LEVEL, power: float = 0.8) -> float:
    """The true mean difference a two-sided t-test of ``n`` values with spread ``sd`` finds with
    probability ``power``: (t_{1-alpha/2} + t_{power}) sd / sqrt(n), n - 1 degrees of freedom."""
    return (_t(n, level) + float(sps.t.ppf(power, n - 1))) * sd / math.sqrt(n)


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Difference:
    """A - B over seeds both ran (``a[i]`` and ``b[i]`` share seed i)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need one of each per seed, got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    s = summarise(d, level)
    if s.n == 1:
        return Difference(s.mean, None, None, 1, None, None, None, True)
    sd = float(s.std or 0.0)
    if sd == 0.0:  # every seed moved by the same amount: a difference with no noise
        p = 0.0 if s.mean != 0 else 1.0
    else:
        p = float(2 * sps.t.sf(abs(s.mean) / (sd / math.sqrt(s.n)), s.n - 1))
    return Difference(s.mean, s.ci_low, s.ci_high, s.n, p, sign_flip_p(d), detectable_effect(sd, s.n, level), True)


def unpaired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Difference:
    """A - B over independent seeds: Welch's t interval and test (no sign-flip test: nothing to pair)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mean = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return Difference(mean, None, None, int(min(x.size, y.size)), None, None, None, False)
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(vx + vy)
    if se == 0.0:
        return Difference(mean, mean, mean, int(min(x.size, y.size)), 0.0 if mean else 1.0, None, 0.0, False)
    df = (vx + vy) ** 2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1))
    t = float(sps.t.ppf(0.5 + level / 2, df))
    p = float(2 * sps.t.sf(abs(mean) / se, df))
    detectable = (t + float(sps.t.ppf(0.8, df))) * se
    return Difference(mean, mean - t * se, mean + t * se, int(min(x.size, y.size)), p, None, detectable, False)


def median_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(median, low, high): the sample median with its distribution-free interval, the order
    statistics x_(j) and x_(n+1-j) for the largest j with P(Binomial(n, 1/2) < j) <= (1 - level) / 2,
    so the interval covers the true median at least ``level`` of the time, whatever the
    distribution (timings: skewed, with outliers). Too few values for the level: (median, min, max)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    if x.size == 0:
        raise ValueError("no values to summarise")
    # the smallest j with P(B <= j) >= alpha / 2, so P(B <= j - 1) < alpha / 2
    j = max(int(sps.binom.ppf((1 - level) / 2, x.size, 0.5)), 1)
    return float(np.median(x)), float(x[j - 1]), float(x[x.size - j])
