"""Calibration of the top-1 prediction: expected calibration error (the per-position Brier score is computed with
the other decision statistics, in ops/margins.py)."""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width bins of p_top1 in [0, 1]."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.size == 0:
        return float("nan")
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)  # bins (lo, hi], first [0, hi]
    count = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, correct, bins) - np.bincount(index, confidence, bins))
    return float(gap.sum() / confidence.size) if count.sum() else float("nan")
