"""Paired comparisons for the experiments: the mean of paired differences, its percentile
bootstrap confidence interval, and an exact sign-flip test.

The unit resampled is whatever the caller pairs: in bench/experiment_mini_alum.py a pretraining
seed (each arm starts from the same weights, data and order as plain MLM for that seed), with the
fine-tuning seeds of a unit averaged first, so the interval reflects the between-seed spread of
the effect. With few units (n <= EXACT_MAX) the bootstrap distribution is computed exactly,
enumerating every resample as a multiset with its multinomial weight; beyond, it is sampled.

With very few units the percentile interval is too narrow to read as a test: with 3 units it
excludes 0 whenever the three differences share a sign, which pure noise does one time in four.
The sign-flip (paired randomisation) test says so in its p-value: under "no effect" each unit's
difference is as likely negated, and its smallest attainable p is 2 / 2**n (0.25 for 3 units,
below 0.05 only from 6 units on). A claim needs both: an interval that excludes 0 and p < 0.05.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

EXACT_MAX = 9
"""Largest number of units whose bootstrap distribution is enumerated (C(2n-1, n) multisets)."""


def _exact(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every bootstrap resample's mean and its probability."""
    n = x.size
    means, weights = [], []
    log_norm = math.lgamma(n + 1) - n * math.log(n)
    for combo in itertools.combinations_with_replacement(range(n), n):
        counts = np.bincount(combo, minlength=n)
        means.append(float(counts @ x) / n)
        weights.append(math.exp(log_norm - sum(math.lgamma(c + 1) for c in counts)))
    return np.asarray(means), np.asarray(weights)


def _quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The inverted-CDF quantile: the smallest value whose cumulative weight reaches q."""
    order = np.argsort(values, kind="stable")
    cdf = np.cumsum(weights[order]) / weights.sum()
    return float(values[order][min(np.searchsorted(cdf, q - 1e-12), len(cdf) - 1)])


SIGN_FLIP_EXACT_MAX = 20
"""Largest number of units whose 2**n sign assignments are enumerated."""


def sign_flip_p(diffs: Sequence[float], *, n_flips: int = 100000, seed: int = 0) -> float:
    """Two-sided p-value of the paired sign-flip test: the share of sign assignments whose mean
    is at least as far from 0 as the observed one (exact up to SIGN_FLIP_EXACT_MAX units)."""
    x = np.asarray(diffs, dtype=np.float64)
    if x.size == 0 or not np.isfinite(x).all():
        raise ValueError("sign_flip_p needs at least one finite difference")
    if x.size <= SIGN_FLIP_EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=x.size)))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_flips, x.size))
    observed = abs(x.mean())
    # A relative tolerance: the assignment equal to the observed one must count despite rounding.
    return float(np.mean(np.abs(signs @ x / x.size) >= observed * (1 - 1e-12)))


def paired_bootstrap(diffs: Sequence[float], *, level: float = 0.95, n_boot: int = 20000,
                     seed: int = 0) -> dict[str, float | int | bool]:
    """``mean`` of the paired differences, the percentile bootstrap interval ``lo``-``hi`` at
    ``level``, ``n`` units, ``excludes_zero`` (the interval lies wholly on one side of 0) and
    ``p_sign_flip`` (``sign_flip_p``)."""
    x = np.asarray(diffs, dtype=np.float64)
    if x.size == 0 or not np.isfinite(x).all():
        raise ValueError("paired_bootstrap needs at least one finite difference")
    if x.size <= EXACT_MAX:
        means, weights = _exact(x)
    else:
        idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
        means, weights = x[idx].mean(axis=1), np.ones(n_boot)
    tail = (1 - level) / 2
    lo, hi = _quantile(means, weights, tail), _quantile(means, weights, 1 - tail)
    return {"mean": float(x.mean()), "lo": lo, "hi": hi, "n": int(x.size),
            "excludes_zero": bool(lo > 0 or hi < 0), "p_sign_flip": sign_flip_p(x)}


def paired_ratio_bootstrap(num: Sequence[float], den: Sequence[float], *, level: float = 0.95,
                           n_boot: int = 20000, seed: int = 0) -> dict[str, float | int]:
    """``ratio`` = mean(num) / mean(den) over paired units (e.g. a variant's reduction of a
    measure and exact ALUM's, per seed) and its percentile bootstrap interval ``lo``-``hi``,
    both means from the same resample of units (exactly enumerated up to EXACT_MAX units). A
    resample whose denominator mean is not positive has no ratio and counts as -inf: the
    interval then says the reference effect itself is not established."""
    x, y = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if x.size == 0 or x.size != y.size or not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired_ratio_bootstrap needs equally many finite pairs")
    n = x.size
    if n <= EXACT_MAX:
        combos = np.array(list(itertools.combinations_with_replacement(range(n), n)))
        counts = np.stack([np.bincount(c, minlength=n) for c in combos])
        log_norm = math.lgamma(n + 1) - n * math.log(n)
        weights = np.exp(log_norm - np.array([sum(math.lgamma(c + 1) for c in row) for row in counts]))
    else:
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        counts = np.stack([np.bincount(r, minlength=n) for r in idx])
        weights = np.ones(n_boot)
    mx, my = counts @ x / n, counts @ y / n
    ratios = np.where(my > 0, mx / np.where(my > 0, my, 1.0), -np.inf)
    tail = (1 - level) / 2
    return {"ratio": float(x.mean() / y.mean()) if y.mean() > 0 else float("-inf"),
            "lo": _quantile(ratios, weights, tail), "hi": _quantile(ratios, weights, 1 - tail), "n": n}
