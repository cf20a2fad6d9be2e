"""Paired comparisons of sweep runs: each run against its control, and Fisher against entropy at matched strength.

Every interval here is paired: a difference of two runs is taken on the SAME block-bootstrap resample
(``samples[r]`` for every run r comes from one stream, hf_mrp.stats), and across seeds the per-seed
differences give a Student t interval (hf_mrp.stats.seed_t_interval). Numpy only.

Entropy matching (docs/spec.md, "Geometry or sharpening"): entropy minimization sharpens the output
distribution without any geometry; to compare it with Fisher at equal strength, the sweep runs entropy
on a grid of lambdas and, for each Fisher lambda, picks the entropy lambda whose mean (over seeds) median
margin change is closest to Fisher's; the report then shows the paired differences Fisher - entropy.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from ...stats import seed_t_interval
from ...stats.flips import finite_or_none
from ...stats.intervals import percentile_interval
from .arguments import MATCHED_OBJECTIVE, REFERENCE_OBJECTIVE
from .results import EntropyMatch, PairedDifference, Row


def _interval(low: float, high: float) -> list[float] | None:
    return [float(low), float(high)] if np.isfinite(low) and np.isfinite(high) else None


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a metric undefined in every pair stays NaN
        return np.nanmean(values, axis=axis)


def paired_difference(
    point: np.ndarray,
    samples: np.ndarray | None,
    pairs: Sequence[tuple[int, int]],
    keys: Sequence[str],
    labels: Sequence[object],
    confidence: float,
) -> dict[str, PairedDifference]:
    """Mean over ``pairs`` (run a, run b; one pair per seed) of metric(a) - metric(b), for every metric.

    ``point``: [runs, metrics]; ``samples``: [resamples, runs, metrics] on shared resamples, or None.
    Each metric gets its mean, the per-pair differences (keyed by ``labels``, e.g. seeds), a paired
    block-bootstrap interval (``ci``: the mean over pairs recomputed on every resample) and a t interval of
    the per-pair differences over seeds (``seed_ci``; None with one pair).
    """
    first, second = (np.asarray(side, dtype=np.int64) for side in zip(*pairs))
    differences = point[first] - point[second]  # [pairs, metrics]
    mean = _nanmean(differences, axis=0)
    bounds = None
    if samples is not None:
        interval = percentile_interval(_nanmean(samples[:, first] - samples[:, second], axis=1), confidence)
        bounds = np.asarray(interval.low), np.asarray(interval.high)
    result = {}
    for k, key in enumerate(keys):
        seed_ci = seed_t_interval(differences[:, k], confidence)
        result[key] = PairedDifference(
            mean=finite_or_none(mean[k]),
            per_seed={str(label): finite_or_none(value) for label, value in zip(labels, differences[:, k])},
            ci=None if bounds is None else _interval(bounds[0][k], bounds[1][k]),
            seed_ci=None if seed_ci is None else _interval(float(seed_ci.low), float(seed_ci.high)),
        )
    return result


def match_entropy(
    rows: Sequence[Row],
    reference: str = REFERENCE_OBJECTIVE,
    by: str = "median_margin_change",
    matched: str = MATCHED_OBJECTIVE,
) -> list[EntropyMatch]:
    """For each plain ``reference`` row, the plain entropy row whose mean ``by`` is closest (ties: smaller lambda).

    Empty when either kind of row is missing (or has no mean ``by``).
    """
    plain = [(row, row.mean(by)) for row in rows if not row.variant and not row.control]
    entropy = [(row, value) for row, value in plain if row.objective == matched and value is not None]
    matches = []
    for row, value in plain:
        if row.objective != reference or value is None or not entropy:
            continue
        best, best_value = min(entropy, key=lambda pair: (abs(pair[1] - value), pair[0].lam))
        matches.append(
            EntropyMatch(
                reference=reference,
                reference_lambda=row.lam,
                reference_value=value,
                entropy_lambda=best.lam,
                entropy_value=best_value,
                gap=best_value - value,
                matched_on=by,
            )
        )
    return matches


__all__ = ["paired_difference", "match_entropy"]
