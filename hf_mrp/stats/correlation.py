"""Spearman's rank correlation, undefined (NaN) where it is: fewer than two positions, or an input that is constant.

A constant column has ranks of zero variance, so the correlation is 0 / 0. scipy returns NaN for it too, with a
ConstantInputWarning on the console; a collapsed model (every logit tied: every margin 0, every entropy log V)
makes every audit's columns constant, so the audit asks first and does not call scipy at all.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr


def is_constant(values: np.ndarray) -> bool:
    """Every value equal to the first (NaNs are never equal, so a column with a NaN is not constant)."""
    values = np.asarray(values)
    return bool(values.size == 0 or np.all(values == values.flat[0]))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho of two equally long columns; NaN when it is undefined (n < 2, or x or y constant)."""
    if np.asarray(x).size < 2 or is_constant(x) or is_constant(y):
        return float("nan")
    return float(spearmanr(x, y).statistic)


__all__ = ["is_constant", "spearman"]
