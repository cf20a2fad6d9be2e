"""The gap-law fit against an independent scipy re-fit of the same margins."""

import numpy as np
from scipy import stats

from hf_mrp.ops import fit_gap_law


def refit(margins):
    m = np.asarray(margins, dtype=np.float64)
    lo = max(np.percentile(m[m > 0], 1), 1e-6)
    hi = np.percentile(m, 25)
    eps = np.exp(np.linspace(np.log(lo), np.log(hi), 32))
    eta = np.array([(m < e).mean() for e in eps])
    keep = (eta > 0) & (eta < 1)
    line = stats.linregress(np.log10(eps[keep]), np.log10(eta[keep]))
    alpha = 10 ** np.mean(np.log10(eta[keep]) - np.log10(eps[keep]))
    return line.slope, line.rvalue**2, alpha, keep.sum()


def test_fit_matches_scipy_refit():
    rng = np.random.default_rng(0)
    margins = rng.gamma(1.3, 1.0, size=20000)
    fit = fit_gap_law(margins)
    beta, r2, alpha, points = refit(margins)
    # the same float64 least squares of at most 32 points of log10 values O(1), in another order (numpy against
    # scipy): about 32 x 2^-53 = 4e-15 times the fit's conditioning; 1e-9 leaves 1e5 for it (and the grids agree:
    # the same percentiles of the same margins)
    assert abs(fit.beta - beta) < 1e-9
    assert abs(fit.r_squared - r2) < 1e-9
    assert abs(fit.alpha - alpha) < 1e-9
    assert fit.fit_points == points == len(fit.curve)


def test_uniform_margins_follow_the_linear_law():
    """For m ~ U(0, 1), eta(eps) = eps exactly: slope 1, alpha 1."""
    margins = (np.arange(100000) + 0.5) / 100000
    fit = fit_gap_law(margins)
    # not rounding but the grid: eta(eps) = round(n eps) / n, relative error <= 1 / (2 n eps) <= 5e-4 at the
    # smallest grid point (the 1st percentile, 0.01), less above it: log10 eta within 2.2e-4 of log10 eps, so the
    # slope within ~1e-4 over the grid's 1.4 decades and alpha within 5e-4 (2x-20x margins below), R^2 ~ 1 - 1e-8
    assert abs(fit.beta - 1) < 1e-3 and fit.r_squared > 0.9999 and abs(fit.alpha - 1) < 1e-2


def test_degenerate_margins_give_nan_not_crash():
    fit = fit_gap_law(np.zeros(10))
    assert np.isnan(fit.beta) and fit.fit_points == 0
