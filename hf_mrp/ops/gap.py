"""The expressibility gap eta(eps) = Pr(m < eps) and its linear scaling law (spec, exactly)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

GRID_POINTS = 32


@dataclass
class GapFit:
    """Log-log OLS fit of eta on eps (slope ``beta``) and the slope-1 gap coefficient ``alpha``."""

    beta: float
    intercept: float
    r_squared: float
    alpha: float
    eps_min: float
    eps_max: float
    fit_points: int
    curve: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def gap_curve(margins: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """eta(eps) for each eps: the fraction of margins strictly below it."""
    ordered = np.sort(np.asarray(margins, dtype=np.float64))
    return np.searchsorted(ordered, eps, side="left") / ordered.size


def fit_gap_law(margins: np.ndarray) -> GapFit:
    """Fit eta(eps) = alpha * eps on 32 log-spaced eps from max(p1 of positive margins, 1e-6) to p25."""
    m = np.asarray(margins, dtype=np.float64)
    positive = m[m > 0]
    nan = float("nan")
    if m.size == 0 or positive.size == 0:
        return GapFit(nan, nan, nan, nan, nan, nan, 0, [])
    eps_min = max(float(np.percentile(positive, 1)), 1e-6)
    eps_max = float(np.percentile(m, 25))
    if not eps_max > eps_min:
        return GapFit(nan, nan, nan, nan, eps_min, eps_max, 0, [])
    eps = np.logspace(np.log10(eps_min), np.log10(eps_max), GRID_POINTS)
    eta = gap_curve(m, eps)
    keep = (eta > 0) & (eta < 1)
    log_eps, log_eta = np.log10(eps[keep]), np.log10(eta[keep])
    curve = [[float(e), float(h)] for e, h in zip(eps[keep], eta[keep])]
    if keep.sum() < 2:
        return GapFit(nan, nan, nan, nan, eps_min, eps_max, int(keep.sum()), curve)
    beta, intercept = np.polyfit(log_eps, log_eta, 1)
    residual = log_eta - (beta * log_eps + intercept)
    total = log_eta - log_eta.mean()
    r_squared = 1.0 - float(residual @ residual) / float(total @ total) if total @ total > 0 else nan
    alpha = float(10 ** np.mean(log_eta - log_eps))
    return GapFit(float(beta), float(intercept), r_squared, alpha, eps_min, eps_max, int(keep.sum()), curve)
