"""manifold.png: each hidden-state manifold statistic against the layer, for one audit or several (before and
after) on the same axes, so a reader sees whether refinement reshaped the manifold and where."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .plots import pyplot, save_figure

PANELS = (  # (layers.json key, title)
    ("participation_ratio", "participation ratio"),
    ("variance_dims", "principal components for 50 / 75 / 90 / 95 / 99% of variance"),
    ("intrinsic_dimension_twonn", "intrinsic dimension (TwoNN)"),
    ("intrinsic_dimension_mle", "intrinsic dimension (Levina-Bickel MLE)"),
    ("curvature", "local-PCA curvature (variance outside the tangent plane)"),
    ("tangent_rotation", "tangent-plane rotation per unit distance"),
)
LEVEL_STYLES = {"50": ":", "75": "-.", "90": "--", "95": "-", "99": (0, (6, 1, 1, 1, 1, 1))}


def _values(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """The layers with a value of ``key`` and those values (a statistic is null where it is undefined)."""
    pairs = [(row["layer"], row[key]) for row in rows if row.get(key) is not None]
    return [layer for layer, _ in pairs], [float(value) for _, value in pairs]


def plot_manifold(path: str | Path, rows_by_label: dict[str, Sequence[dict]]) -> None:
    """Six panels against the layer: participation ratio, variance dimensions (one line per level), TwoNN, MLE,
    curvature and tangent rotation; one colour per audit in ``rows_by_label`` (layers.json rows)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title) in zip(axes.flat, PANELS):
        for index, (label, rows) in enumerate(rows_by_label.items()):
            color = f"C{index}"
            if key == "variance_dims":
                for level, style in LEVEL_STYLES.items():
                    pairs = [(r["layer"], r[key][level]) for r in rows if r.get(key)]
                    x, y = [p[0] for p in pairs], [p[1] for p in pairs]
                    ax.plot(x, y, ls=style, color=color, label=f"{label} {level}%")
            else:
                layers, values = _values(rows, key)
                ax.plot(layers, values, "o-", ms=3, color=color, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6 if key == "variance_dims" else 7)
    fig.suptitle("Hidden-state manifold per layer")
    fig.tight_layout()
    save_figure(fig, path)
