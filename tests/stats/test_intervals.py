"""hf_mrp.stats.intervals: the percentile interval against numpy's quantiles and known answers (the resampling
itself, against scipy, is test_stats_resampling's)."""

import numpy as np
import pytest

from hf_mrp.stats.intervals import Interval, percentile_interval


def test_interval_is_the_linear_quantiles_of_the_samples():
    samples = np.random.default_rng(1).normal(size=(501, 3))
    low, high = percentile_interval(samples, 0.9)
    ordered = np.sort(samples, axis=0)  # 501 samples: quantile q sits at index 500 q, 25 and 475 here
    # linear interpolation at an integer index: the order statistic, up to one float64 rounding (2^-53)
    np.testing.assert_allclose(low, ordered[25], rtol=1e-12)
    np.testing.assert_allclose(high, ordered[475], rtol=1e-12)
    assert percentile_interval(np.arange(5.0), 0.5) == Interval(1.0, 3.0)  # quantiles 0.25 and 0.75 of 0..4


def test_constant_samples_give_a_zero_width_interval():
    low, high = percentile_interval(np.full(257, 0.37))
    assert low == high == pytest.approx(0.37)


def test_undefined_resamples_are_dropped_and_all_undefined_gives_nan():
    samples = np.array([1.0, 2.0, np.nan, 3.0, np.inf])
    assert percentile_interval(samples, 0.5) == percentile_interval(np.array([1.0, 2.0, 3.0]), 0.5)
    low, high = percentile_interval(np.full((10, 2), np.nan))
    assert np.isnan(low).all() and np.isnan(high).all()


def test_bad_confidence():
    for confidence in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="confidence"):
            percentile_interval(np.ones(3), confidence)
