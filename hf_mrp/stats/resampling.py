"""Intervals that respect how the audited positions were drawn (docs/spec.md, "Intervals").

The audited positions are consecutive tokens of a few contiguous blocks, so neighbouring positions
are correlated; resampling single positions treats them as independent and gives intervals that are
too narrow. The block (cluster) bootstrap resamples whole blocks instead: a resample draws
``n_blocks`` blocks with replacement and takes every position of each drawn block (a block drawn
twice contributes its positions twice), so a resample's size varies when blocks differ in size.

Block draws are ``numpy.random.default_rng(seed).integers(0, n_blocks, (n_resamples, n_blocks))``
(row batches give the same stream), the way ``scipy.stats.bootstrap`` draws positions: with blocks
of one position each, the block bootstrap is scipy's percentile bootstrap, index for index.

Paired differences (a run minus its control) are taken on the same resample for both runs; across
seeds, the spread of the per-seed paired differences gives a Student t interval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .intervals import MAX_INDEX_ELEMENTS, Interval, percentile_interval


@dataclass(frozen=True)
class BlockIndex:
    """Positions grouped by block: ``order`` lists position indices block by block, ``starts`` and
    ``sizes`` give each block's slice of ``order``."""

    order: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray

    @classmethod
    def from_labels(cls, block_of: np.ndarray) -> BlockIndex:
        """From one block label per position (any integers; positions of a block need not be adjacent)."""
        labels = np.asarray(block_of)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"block labels must be a non-empty 1-d array, got shape {labels.shape}")
        order = np.argsort(labels, kind="stable")
        _, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
        return cls(order, starts.astype(np.int64), sizes.astype(np.int64))

    @property
    def n_blocks(self) -> int:
        return int(self.sizes.size)

    @property
    def n_positions(self) -> int:
        return int(self.order.size)

    def positions_of(self, blocks: np.ndarray) -> np.ndarray:
        """The position indices of the drawn ``blocks`` (a 1-d array of block numbers), block after block."""
        sizes = self.sizes[blocks]
        total = int(sizes.sum())
        first = np.cumsum(sizes) - sizes  # where each drawn block begins in the result
        offsets = np.arange(total) - np.repeat(first, sizes) + np.repeat(self.starts[blocks], sizes)
        return self.order[offsets]


def block_resamples(blocks: BlockIndex, n_resamples: int, seed: int | None = 0) -> Iterator[np.ndarray]:
    """``n_resamples`` arrays of position indices, each the positions of ``n_blocks`` blocks drawn with replacement."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    rng = np.random.default_rng(seed)
    rows = max(1, MAX_INDEX_ELEMENTS // blocks.n_blocks)
    for start in range(0, n_resamples, rows):
        for drawn in rng.integers(0, blocks.n_blocks, (min(rows, n_resamples - start), blocks.n_blocks)):
            yield blocks.positions_of(drawn)


def block_bootstrap_distribution(
    statistic: Callable[[np.ndarray], float | np.ndarray], blocks: BlockIndex, n_resamples: int, seed: int | None = 0
) -> np.ndarray:
    """``statistic(position_indices)`` on each block resample: ``[n_resamples]`` or ``[n_resamples, ...]``.

    One stream drives every number a statistic returns, so differences between its entries (a run and
    its control) are paired: both are computed on the same resampled blocks.
    """
    return np.stack(
        [np.asarray(statistic(index), dtype=np.float64) for index in block_resamples(blocks, n_resamples, seed)]
    )


def paired_interval(samples: np.ndarray, control_samples: np.ndarray, confidence: float = 0.95) -> Interval:
    """Percentile interval of ``samples - control_samples``: two bootstrap distributions drawn on the SAME
    resamples (axis 0), so the difference keeps the pairing. A run against itself gives a zero-width interval."""
    samples, control_samples = np.asarray(samples, np.float64), np.asarray(control_samples, np.float64)
    if samples.shape != control_samples.shape:
        raise ValueError(
            f"paired bootstrap samples must have one shape, got {samples.shape} and {control_samples.shape}"
        )
    return percentile_interval(samples - control_samples, confidence)


def seed_t_interval(differences: np.ndarray, confidence: float = 0.95) -> Interval | None:
    """Student t interval of the mean of per-seed paired differences (run minus control of the same seed):
    mean +- t_{n-1} * sd / sqrt(n) over the finite values; None with fewer than two seeds (no spread)."""
    from scipy.stats import t

    values = np.asarray(differences, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < 2:
        return None
    half = float(t.ppf((1.0 + confidence) / 2.0, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size))
    mean = float(values.mean())
    return Interval(mean - half, mean + half)
