"""bench/_stats.py: the paired bootstrap the experiments report, against distributions worked out
by hand."""

from __future__ import annotations

import pytest

from bench._stats import paired_bootstrap, sign_flip_p


def test_two_units_exact_distribution() -> None:
    # Resamples of [1, 3]: means 1, 2, 3 with probabilities 1/4, 1/2, 1/4.
    r = paired_bootstrap([1.0, 3.0])
    assert r == {"mean": 2.0, "lo": 1.0, "hi": 3.0, "n": 2, "excludes_zero": True, "p_sign_flip": 0.5}
    # At the 40% level the tails are 30%: CDF(1) = 0.25 < 0.30 <= CDF(2) = 0.75 on both sides.
    assert paired_bootstrap([1.0, 3.0], level=0.4)["lo"] == 2.0
    assert paired_bootstrap([1.0, 3.0], level=0.4)["hi"] == 2.0


def test_three_units_interval_touching_zero() -> None:
    # [0, 0, 3]: the number k of 3s drawn is Binomial(3, 1/3), the mean is k: P = 8, 12, 6, 1 / 27.
    # 2.5%: CDF(0) = 8/27 -> 0. 97.5%: CDF(2) = 26/27 = 0.963 < 0.975 -> 3.
    r = paired_bootstrap([0.0, 0.0, 3.0])
    assert (r["mean"], r["lo"], r["hi"], r["excludes_zero"]) == (1.0, 0.0, 3.0, False)
    # At 80% the upper tail is 10%: CDF(1) = 20/27 = 0.74 < 0.9 <= CDF(2) -> 2.
    assert paired_bootstrap([0.0, 0.0, 3.0], level=0.8)["hi"] == 2.0


def test_many_units_are_sampled_and_agree_with_the_normal_approximation() -> None:
    diffs = [0.1 * (i % 7) - 0.2 for i in range(40)]
    r = paired_bootstrap(diffs, n_boot=40000, seed=1)
    mean = sum(diffs) / 40
    se = (sum((d - mean) ** 2 for d in diffs) / 40) ** 0.5 / 40 ** 0.5
    assert r["n"] == 40 and r["mean"] == pytest.approx(mean)
    assert r["lo"] == pytest.approx(mean - 1.96 * se, abs=0.2 * se)
    assert r["hi"] == pytest.approx(mean + 1.96 * se, abs=0.2 * se)


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        paired_bootstrap([])
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, float("nan")])


def test_sign_flip_exact_against_hand_counts() -> None:
    # [1, 2, 3]: of the 8 sign assignments only (+,+,+) and (-,-,-) reach |mean| 2: p = 2/8.
    assert sign_flip_p([1.0, 2.0, 3.0]) == 0.25
    # [3, -1, 1]: |mean| 1; assignments with |3s1 - s2 + s3| >= 3: s1 fixed, the other two
    # give 3-1+1=3, 3+1+1=5, 3-1-1=1, 3+1-1=3 -> 3 of 4, for either sign of s1: p = 6/8.
    assert sign_flip_p([3.0, -1.0, 1.0]) == 0.75
    # Six units of one sign: 2/64 < 0.05, the fewest units that can pass at 95%.
    assert sign_flip_p([0.1, 0.2, 0.3, 0.1, 0.2, 0.3]) == pytest.approx(2 / 64)
    # Three identical differences: the bootstrap interval is a point that excludes 0, and the
    # test still cannot go below 2/8.
    r = paired_bootstrap([-0.006, -0.006, -0.006])
    assert r["excludes_zero"] and r["p_sign_flip"] == 0.25


def test_paired_ratio_bootstrap() -> None:
    from bench._stats import paired_ratio_bootstrap

    # a variant keeping exactly 80% of the reference effect in every unit: a point interval
    den = [0.1, 0.3, 0.2, 0.25, 0.15, 0.4]
    r = paired_ratio_bootstrap([0.8 * d for d in den], den)
    assert abs(r["ratio"] - 0.8) < 1e-12 and abs(r["lo"] - 0.8) < 1e-12 and abs(r["hi"] - 0.8) < 1e-12
    # a noisy one: the interval brackets the ratio of means
    r = paired_ratio_bootstrap([0.1, 0.5, 0.0, 0.3, 0.2, 0.1], den)
    assert r["lo"] < r["ratio"] < r["hi"] and r["n"] == 6
    # a reference effect that is not established: resamples without a positive denominator
    r = paired_ratio_bootstrap([0.1, 0.1, 0.1], [0.2, -0.3, 0.05])
    assert r["lo"] == float("-inf")
