"""Percentile bootstrap confidence intervals over positions (pure numpy).

A resample draws n positions with replacement from the n audited ones. Index streams are drawn as
``numpy.random.default_rng(seed).integers(0, n, (n_resamples, n))`` (in row batches, which gives the
same stream), the way ``scipy.stats.bootstrap`` draws them, so for the same data, statistic and seed
``bootstrap_ci`` returns scipy's ``method="percentile"`` interval. The interval is the linear-
interpolated (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of the bootstrap distribution.

Statistics that are undefined on some resamples (a ratio whose denominator is 0 there) return NaN for
those resamples; the interval is taken over the finite ones, and is NaN when none is finite.

One index stream can drive many statistics at once (``bootstrap_distribution`` with a statistic that
returns an array): every number of a sweep is resampled with the same positions, so paired
differences (net of a run minus net of its control) keep their pairing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

MAX_INDEX_ELEMENTS = 1 << 22  # indices drawn per batch (32 MiB of int64)


class Interval(NamedTuple):
    """A confidence interval: ``low`` and ``high`` are floats, or arrays for an array-valued statistic."""

    low: float | np.ndarray
    high: float | np.ndarray


def resample_indices(n: int, n_resamples: int, seed: int | None = 0,
                     max_elements: int = MAX_INDEX_ELEMENTS) -> Iterator[np.ndarray]:
    """Batches ``[b, n]`` of resampled position indices, ``n_resamples`` rows in all."""
    if n < 1:
        raise ValueError(f"a bootstrap needs at least one position, got n={n}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    rng = np.random.default_rng(seed)
    rows = max(1, max_elements // n)
    for start in range(0, n_resamples, rows):
        yield rng.integers(0, n, (min(rows, n_resamples - start), n))


def bootstrap_distribution(statistic: Callable[[np.ndarray], float | np.ndarray], n: int, n_resamples: int,
                           seed: int | None = 0) -> np.ndarray:
    """``statistic(indices)`` for each resample (``indices``: int array of n positions).

    Returns ``[n_resamples]`` for a scalar statistic, ``[n_resamples, ...]`` for an array-valued one.
    """
    values = [np.asarray(statistic(row), dtype=np.float64)
              for batch in resample_indices(n, n_resamples, seed) for row in batch]
    return np.stack(values)


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


def bootstrap_ci(
    values_or_statistic: np.ndarray | Sequence[np.ndarray] | Callable[[np.ndarray], float | np.ndarray],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
    *,
    n: int | None = None,
    statistic: Callable[..., float | np.ndarray] | None = None,
) -> Interval:
    """Percentile bootstrap confidence interval over positions.

    ``values_or_statistic`` is either

    - per-position values: one array (positions on axis 0) or a tuple of equally long arrays (paired
      columns, resampled together); ``statistic(*resampled)`` gives the number (default: the mean of
      a single array), e.g. ``bootstrap_ci((w2r, r2w), statistic=lambda a, b: a.sum() - b.sum())``;
    - or a callable ``f(indices) -> number or array`` that computes the statistic from the resampled
      position indices itself (then pass ``n``, the number of positions), e.g. a statistic of several
      runs' per-position arrays resampled with the same indices.
    """
    _check_confidence(confidence)
    if callable(values_or_statistic):
        if n is None:
            raise ValueError("pass n (the number of positions) with a callable statistic")
        if statistic is not None:
            raise ValueError("pass either a callable or values with statistic=, not both")
        return percentile_interval(bootstrap_distribution(values_or_statistic, n, n_resamples, seed), confidence)
    paired = isinstance(values_or_statistic, (tuple, list))
    columns = [np.asarray(v) for v in values_or_statistic] if paired else [np.asarray(values_or_statistic)]
    lengths = {len(column) for column in columns}
    if len(lengths) != 1:
        raise ValueError(f"paired per-position arrays must be equally long, got lengths {sorted(lengths)}")
    size = lengths.pop()
    if n is not None and n != size:
        raise ValueError(f"n={n} does not match the {size} per-position values")
    if statistic is None:
        if len(columns) != 1:
            raise ValueError("pass statistic= for several per-position arrays")
        column = columns[0].astype(np.float64)
        samples = np.concatenate([column[batch].mean(axis=1) for batch in resample_indices(size, n_resamples, seed)])
        return percentile_interval(samples, confidence)
    return percentile_interval(
        bootstrap_distribution(lambda index: statistic(*(c[index] for c in columns)), size, n_resamples, seed),
        confidence,
    )


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")


__all__ = ["Interval", "bootstrap_ci", "bootstrap_distribution", "percentile_interval", "resample_indices"]
