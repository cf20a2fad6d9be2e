"""Matplotlib figures (Agg backend, written atomically as PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..storage.files import write_with


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed): every figure of hf_mrp starts here."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    """Write ``fig`` as a PNG atomically (a reader never sees half a file) and free it."""
    write_with(path, lambda temporary: fig.savefig(temporary, format="png", dpi=120, bbox_inches="tight"))
    pyplot().close(fig)


def legend(ax, **kwargs) -> None:
    """``ax.legend(**kwargs)`` when the axes has labelled artists; else none (matplotlib would warn "No artists
    with labels found to put in legend" and draw an empty box: a collapsed model's gap curve has no point)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def plot_gap_curves(path: str | Path, fits: dict[str, dict], title: str = "Expressibility gap") -> None:
    """log-log eta(eps) for one or more audits, each with its fitted power law and slope-1 alpha line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for index, (label, fit) in enumerate(fits.items()):
        color = f"C{index}"
        curve = np.asarray(fit.get("curve") or [], dtype=np.float64).reshape(-1, 2)
        if curve.size == 0:
            continue
        eps, eta = curve[:, 0], curve[:, 1]
        ax.loglog(eps, eta, "o", ms=3.5, color=color, label=f"{label}: eta(eps)")
        if fit.get("beta") is not None:
            ax.loglog(
                eps,
                10 ** (fit["beta"] * np.log10(eps) + fit["intercept"]),
                "-",
                color=color,
                label=f"{label}: fit beta={fit['beta']:.3f}, R^2={fit['r_squared']:.4f}",
            )
            ax.loglog(eps, fit["alpha"] * eps, ":", color=color, label=f"{label}: alpha*eps, alpha={fit['alpha']:.3f}")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("eps (logit margin)")
    ax.set_ylabel("eta(eps) = Pr(m < eps)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    legend(ax, fontsize=7)
    save_figure(fig, path)


def plot_margin_histograms(path: str | Path, margins: dict[str, np.ndarray], title: str = "Decision margins") -> None:
    """Overlaid histograms of top-1 minus top-2 logit margins."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    upper = max(float(np.percentile(m, 99)) for m in margins.values() if len(m)) if margins else 1.0
    bins = np.linspace(0.0, max(upper, 1e-3), 80)
    for label, m in margins.items():
        ax.hist(np.clip(m, 0, bins[-1]), bins=bins, alpha=0.55, label=f"{label} (median {np.median(m):.3f})")
    ax.axvline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xlabel("margin m = z(1) - z(2) (clipped at p99)")
    ax.set_ylabel("positions")
    ax.set_title(title)
    legend(ax, fontsize=8)
    save_figure(fig, path)


def plot_layers(path: str | Path, layers: Sequence[dict], lens: str = "logit") -> None:
    """A lens (logit or tuned): penalty-vs-CE Spearman, median margin and accuracy by layer."""
    plt = pyplot()
    index = [row["layer"] for row in layers]
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    axes[0].plot(index, [row["spearman_fisher_vs_final_ce"] for row in layers], "o-", label="Fisher penalty")
    axes[0].plot(index, [row["spearman_margin_vs_final_ce"] for row in layers], "s-", label="margin penalty")
    axes[0].axhline(0, color="k", lw=0.8)
    axes[0].set_ylabel("Spearman vs final CE")
    legend(axes[0], fontsize=8)
    axes[1].plot(index, [row["margin_percentiles"]["p50"] for row in layers], "o-")
    axes[1].set_ylabel("median margin")
    axes[2].plot(index, [row["accuracy"] for row in layers], "o-")
    axes[2].set_ylabel("top-1 accuracy")
    axes[2].set_xlabel("layer (0-based decoder block; last = final)")
    fig.suptitle(f"Layer-wise geometry ({lens} lens)")
    save_figure(fig, path)
