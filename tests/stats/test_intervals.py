"""hf_mrp.stats.intervals: the percentile bootstrap against known answers and scipy."""

import numpy as np
import pytest
from scipy import stats

from hf_mrp.stats.intervals import (
    Interval,
    bootstrap_ci,
    bootstrap_distribution,
    percentile_interval,
    resample_indices,
)


def test_mean_of_a_large_normal_sample_matches_the_normal_theory_interval():
    x = np.random.default_rng(1).normal(5.0, 2.0, 20_000)
    low, high = bootstrap_ci(x, 2000, seed=3)
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)
    assert low == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(x.mean() + half, abs=0.1 * half)


def test_matches_scipy_percentile_bootstrap_exactly_on_the_same_seed():
    x = np.random.default_rng(2).exponential(1.0, 3000)
    ours = bootstrap_ci(x, 1500, confidence=0.9, seed=11)
    theirs = stats.bootstrap((x,), np.mean, n_resamples=1500, confidence_level=0.9, method="percentile",
                             rng=np.random.default_rng(11)).confidence_interval
    np.testing.assert_allclose([ours.low, ours.high], [theirs.low, theirs.high], rtol=1e-12)
    median = bootstrap_ci(x, 500, seed=4, statistic=np.median)  # any statistic, not only the mean
    theirs = stats.bootstrap((x,), np.median, n_resamples=500, method="percentile",
                             rng=np.random.default_rng(4)).confidence_interval
    np.testing.assert_allclose([median.low, median.high], [theirs.low, theirs.high], rtol=1e-12)


def test_constant_sample_gives_a_zero_width_interval():
    assert bootstrap_ci(np.full(257, 0.37), 300) == Interval(pytest.approx(0.37), pytest.approx(0.37))
    low, high = bootstrap_ci(np.full(257, 0.37), 300)
    assert low == high


def test_callable_values_and_paired_columns_agree():
    rng = np.random.default_rng(3)
    w2r, r2w = rng.random(800) < 0.2, rng.random(800) < 0.1
    net = lambda a, b: a.sum() - b.sum()  # noqa: E731
    paired = bootstrap_ci((w2r, r2w), 400, seed=5, statistic=net)
    by_index = bootstrap_ci(lambda i: w2r[i].sum() - r2w[i].sum(), 400, seed=5, n=800)
    assert paired == by_index
    assert paired.low < net(w2r, r2w) < paired.high
    both = bootstrap_ci(lambda i: np.array([w2r[i].sum(), r2w[i].sum()]), 400, seed=5, n=800)
    assert both.low.shape == (2,) and np.all(both.low <= both.high)


def test_same_seed_same_interval_and_batches_give_the_same_stream():
    x = np.random.default_rng(4).normal(size=100)
    assert bootstrap_ci(x, 200, seed=9) == bootstrap_ci(x, 200, seed=9)
    assert bootstrap_ci(x, 200, seed=9) != bootstrap_ci(x, 200, seed=10)
    whole = np.concatenate(list(resample_indices(100, 250, seed=6, max_elements=10**9)))
    pieces = np.concatenate(list(resample_indices(100, 250, seed=6, max_elements=700)))
    np.testing.assert_array_equal(whole, pieces)
    np.testing.assert_array_equal(whole, np.random.default_rng(6).integers(0, 100, (250, 100)))


def test_undefined_resamples_are_dropped_and_all_undefined_gives_nan():
    samples = np.array([1.0, 2.0, np.nan, 3.0, np.inf])
    assert percentile_interval(samples, 0.5) == percentile_interval(np.array([1.0, 2.0, 3.0]), 0.5)
    low, high = percentile_interval(np.full((10, 2), np.nan))
    assert np.isnan(low).all() and np.isnan(high).all()
    ratio = bootstrap_distribution(lambda i: np.nan, 5, 7)
    assert ratio.shape == (7,)


def test_bad_arguments():
    with pytest.raises(ValueError, match="pass n"):
        bootstrap_ci(lambda i: 0.0, 10)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(np.ones(3), 10, confidence=1.0)
    with pytest.raises(ValueError, match="equally long"):
        bootstrap_ci((np.ones(3), np.ones(4)), 10, statistic=lambda a, b: 0.0)
    with pytest.raises(ValueError, match="at least one position"):
        bootstrap_ci(np.ones(0), 10)
