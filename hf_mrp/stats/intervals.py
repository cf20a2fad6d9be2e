"""Percentile intervals of bootstrap distributions (pure numpy); the resampling itself is resampling.py's.

The interval is the linear-interpolated (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of the
bootstrap distribution (axis 0), which is scipy's ``method="percentile"`` interval for the same draws.

Statistics that are undefined on some resamples (a ratio whose denominator is 0 there) return NaN for
those resamples; the interval is taken over the finite ones, and is NaN when none is finite.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

MAX_INDEX_ELEMENTS = 1 << 22  # indices drawn per batch (32 MiB of int64)


class Interval(NamedTuple):
    """A confidence interval: ``low`` and ``high`` are floats, or arrays for an array-valued statistic."""

    low: float | np.ndarray
    high: float | np.ndarray


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> Interval:
    """The percentile interval of a bootstrap distribution (axis 0), over its finite values."""
    _check_confidence(confidence)
    samples = np.asarray(samples, dtype=np.float64)
    quantiles = [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0]
    finite = np.isfinite(samples)
    if finite.all():
        low, high = np.quantile(samples, quantiles, axis=0)
    else:
        masked = np.where(finite, samples, np.nan)
        with warnings.catch_warnings():  # an all-NaN column gives a NaN interval on purpose
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanquantile(masked, quantiles, axis=0)
    if np.ndim(low) == 0:
        return Interval(float(low), float(high))
    return Interval(low, high)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")


__all__ = ["Interval", "percentile_interval"]
