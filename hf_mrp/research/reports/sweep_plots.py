"""Dose-response plots of a sweep (`hf-mrp sweep`): numbers vs lambda, one curve per objective.

Each plot reads the sweep's rows (sweep.results.Row: objective, lambda, control, and per metric its mean and
interval). The lambda = 0 control row starts every objective's curve. Error bars are the block-bootstrap
confidence intervals (resampling whole audited blocks, sweep/aggregate.py) that results.json holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...reporting.plots import legend, pyplot, save_figure

if TYPE_CHECKING:
    from ..sweep.results import Row


def dose_series(rows: Sequence[Row], objective: str, metric: str) -> tuple[np.ndarray, ...]:
    """(lambda, mean, ci low, ci high) of ``metric`` for ``objective``, the control first; NaN where missing."""
    chosen = sorted((row for row in rows if row.control or row.objective == objective), key=lambda row: row.lam)
    lam, mean, low, high = [], [], [], []
    for row in chosen:
        entry = row.metrics.get(metric)
        ci = (entry.ci if entry is not None else None) or (None, None)
        lam.append(row.lam)
        mean.append(_float(None if entry is None else entry.mean))
        low.append(_float(ci[0]))
        high.append(_float(ci[1]))
    return tuple(np.asarray(v, dtype=np.float64) for v in (lam, mean, low, high))


def _float(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _error_bars(mean: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """[2, n] non-negative distances from the mean to the interval ends (0 where there is no interval)."""
    below = np.where(np.isfinite(low) & np.isfinite(mean), mean - low, 0.0)
    above = np.where(np.isfinite(high) & np.isfinite(mean), high - mean, 0.0)
    return np.clip(np.vstack([below, above]), 0.0, None)


def _curve(ax, rows, objective, metric, scale=1.0, **style):
    lam, mean, low, high = dose_series(rows, objective, metric)
    ax.errorbar(lam, scale * mean, yerr=scale * _error_bars(mean, low, high), capsize=3, marker="o", ms=4, **style)


def _lambda_axis(ax) -> None:
    ax.set_xlabel("lambda (0 = control: cross-entropy only)")
    ax.grid(True, alpha=0.3)


def plot_flips_vs_lambda(path: str | Path, rows: Sequence[Row], objectives: Sequence[str], confidence: float = 0.95):
    """W->R (corrections) and R->W (collateral damage) vs lambda, one curve per objective."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for index, objective in enumerate(objectives):
        for ax, metric in zip(axes, ("w2r", "r2w")):
            _curve(ax, rows, objective, metric, color=f"C{index}", label=objective)
    for ax, title in zip(axes, ("W->R (corrections)", "R->W (collateral damage)")):
        ax.set_title(title)
        ax.set_ylabel("positions (mean over seeds)")
        _lambda_axis(ax)
        legend(ax, fontsize=8)
    fig.suptitle(f"Flips vs lambda (error bars: bootstrap {confidence:.0%} CI over positions)", fontsize=10)
    save_figure(fig, path)


def plot_margin_change_vs_lambda(
    path: str | Path, rows: Sequence[Row], objectives: Sequence[str], confidence: float = 0.95
):
    """Median margin change (after / before - 1, percent) vs lambda, one curve per objective."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for index, objective in enumerate(objectives):
        _curve(ax, rows, objective, "median_margin_change", scale=100.0, color=f"C{index}", label=objective)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("median margin change (%)")
    ax.set_title(f"Median margin change vs lambda (bootstrap {confidence:.0%} CI)", fontsize=10)
    _lambda_axis(ax)
    legend(ax, fontsize=8)
    save_figure(fig, path)


def plot_class_net_vs_lambda(
    path: str | Path, rows: Sequence[Row], objectives: Sequence[str], classes: Sequence[str], confidence: float = 0.95
):
    """Net corrections (W->R - R->W) by token class of the target vs lambda: one panel per objective."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(objectives), figsize=(5.2 * len(objectives), 4.2), sharey=True, squeeze=False)
    for ax, objective in zip(axes[0], objectives):
        for index, label in enumerate(classes):
            _curve(ax, rows, objective, f"net_{label}", color=f"C{index}", label=label)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(objective)
        _lambda_axis(ax)
    axes[0][0].set_ylabel("net corrections (positions, mean over seeds)")
    legend(axes[0][-1], fontsize=8, title="target class")
    fig.suptitle(f"Net corrections by token class vs lambda (bootstrap {confidence:.0%} CI)", fontsize=10)
    save_figure(fig, path)


__all__ = ["dose_series", "plot_flips_vs_lambda", "plot_margin_change_vs_lambda", "plot_class_net_vs_lambda"]
