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


def _interval(interval) -> list[float] | None:
    if interval is None:
        return None
    low, high = float(interval[0]), float(interval[1])
    return [low, high] if np.isfinite(low) and np.isfinite(high) else None


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a metric undefined in every pair stays NaN
        return np.nanmean(values, axis=axis)


def paired_difference(
    point: np.ndarray,
    samples: np.ndarray | None,
    pairs: Sequence[tuple[int, int]],
    keys: Sequence[str],
    labels: Sequence[str],
    confidence: float,
) -> dict:
    """Mean over ``pairs`` (run a, run b; one pair per seed) of metric(a) - metric(b), for every metric.

    ``point``: [runs, metrics]; ``samples``: [resamples, runs, metrics] on shared resamples, or None.
    Each metric gets its mean, the per-pair differences (keyed by ``labels``, e.g. seeds), a paired
    block-bootstrap interval (``ci``: the mean over pairs recomputed on every resample) and a t interval of
    the per-pair differences over seeds (``seed_ci``; None with one pair).
    """
    first, second = (np.asarray(side, dtype=np.int64) for side in zip(*pairs))
    differences = point[first] - point[second]  # [pairs, metrics]
    mean = _nanmean(differences, axis=0)
    if samples is not None:
        low, high = percentile_interval(_nanmean(samples[:, first] - samples[:, second], axis=1), confidence)
    result = {}
    for k, key in enumerate(keys):
        result[key] = {
            "mean": finite_or_none(mean[k]),
            "per_seed": {str(label): finite_or_none(value) for label, value in zip(labels, differences[:, k])},
            "ci": None if samples is None else _interval((low[k], high[k])),
            "seed_ci": _interval(seed_t_interval(differences[:, k], confidence)),
        }
    return result


def match_entropy(rows: Sequence[dict], reference: str = "fisher", by: str = "median_margin_change") -> list[dict]:
    """For each plain ``reference`` row, the plain entropy row whose mean ``by`` is closest (ties: smaller lambda).

    Returns [{"reference_lambda", "reference_value", "entropy_lambda", "entropy_value", "gap"}]; empty when
    either kind of row is missing.
    """

    def value(row: dict) -> float | None:
        entry = row["metrics"].get(by)
        return None if entry is None else entry["mean"]

    plain = [row for row in rows if not row.get("variant") and not row["control"]]
    entropy = [row for row in plain if row["objective"] == "entropy" and value(row) is not None]
    matches = []
    for row in (r for r in plain if r["objective"] == reference and value(r) is not None):
        if not entropy:
            break
        best = min(entropy, key=lambda e: (abs(value(e) - value(row)), e["lambda"]))
        matches.append(
            {
                "reference": reference,
                "reference_lambda": row["lambda"],
                "reference_value": value(row),
                "entropy_lambda": best["lambda"],
                "entropy_value": value(best),
                "gap": value(best) - value(row),
                "matched_on": by,
            }
        )
    return matches


__all__ = ["paired_difference", "match_entropy"]
