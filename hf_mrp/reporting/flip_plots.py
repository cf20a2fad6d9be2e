"""Bar charts of the before/after flip audit (corrections up, collateral damage down, net marked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .plots import legend, pyplot, save_figure


def plot_net_bars(path: str | Path, groups: dict[str, dict], title: str, xlabel: str = "") -> None:
    """W->R above zero, R->W below, net as a black marker, for each group ({label: {w2r, r2w, net, n}})."""
    plt = pyplot()
    labels = list(groups)
    x = np.arange(len(labels))
    w2r = np.array([groups[label]["w2r"] for label in labels], dtype=np.float64)
    r2w = np.array([groups[label]["r2w"] for label in labels], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) + 2), 4))
    ax.bar(x, w2r, color="C2", alpha=0.75, label="W->R (corrections)")
    ax.bar(x, -r2w, color="C3", alpha=0.75, label="R->W (collateral damage)")
    ax.plot(x, w2r - r2w, "D", color="k", ms=6, label="net")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, [f"{label}\n(n={groups[label].get('n', 0)})" for label in labels], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("positions")
    ax.set_title(title)
    legend(ax, fontsize=8)
    save_figure(fig, path)
