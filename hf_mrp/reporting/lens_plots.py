"""Pictures of the layer-wise lens statistics (layers.json rows), one lens or the logit and tuned lens side by side:
a layer x statistic heatmap and per-layer curves (PNG, written atomically)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .plots import legend, pyplot, save_figure

# (label, value of a layers.json row); the heatmap colours each statistic on its own scale, shared by the lenses
STATISTICS: list[tuple[str, Callable[[dict], float]]] = [
    ("KL(final||layer)", lambda row: row["mean_kl_to_final"]),
    ("agreement", lambda row: row["agreement_with_final"]),
    ("top-1 rate", lambda row: row["target_rank"]["top1_rate"]),
    ("top-5 rate", lambda row: row["target_rank"]["top5_rate"]),
    ("median rank", lambda row: row["target_rank"]["median"]),
    ("entropy", lambda row: row["mean_entropy"]),
    ("CE", lambda row: row["mean_cross_entropy"]),
    ("median margin", lambda row: row["margin_percentiles"]["p50"]),
    ("rho(Fisher, CE)", lambda row: row["spearman_fisher_vs_final_ce"]),
    ("rho(margin, CE)", lambda row: row["spearman_margin_vs_final_ce"]),
]


def statistic_matrix(rows: Sequence[dict]) -> np.ndarray:
    """[layers x STATISTICS] values of one lens (NaN where a value is null)."""
    return np.array([[np.nan if get(row) is None else float(get(row)) for _, get in STATISTICS] for row in rows])


def column_ranges(stacked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column's lowest and highest finite value; (0, 0) for a column with none (a collapsed model's
    correlations are all undefined), where ``np.nanmin`` would warn of an all-NaN slice."""
    finite = np.isfinite(stacked)
    low = np.where(finite, stacked, np.inf).min(axis=0)
    high = np.where(finite, stacked, -np.inf).max(axis=0)
    empty = ~finite.any(axis=0)
    low[empty], high[empty] = 0.0, 0.0
    return low, high


def plot_lens_heatmap(path: str | Path, rows_by_lens: dict[str, Sequence[dict]]) -> None:
    """One panel per lens: layers down, statistics across, each statistic coloured on one scale for all lenses and
    annotated with its value."""
    plt = pyplot()
    matrices = {lens: statistic_matrix(rows) for lens, rows in rows_by_lens.items()}
    stacked = np.vstack(list(matrices.values()))
    low, high = column_ranges(stacked)
    span = np.where(high > low, high - low, 1.0)
    n_layers = max(len(rows) for rows in rows_by_lens.values())
    fig, axes = plt.subplots(1, len(matrices), figsize=(6.5 * len(matrices), 1.6 + 0.28 * n_layers), squeeze=False)
    for ax, (lens, matrix) in zip(axes[0], matrices.items()):
        ax.imshow((matrix - low) / span, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(
                    j,
                    i,
                    f"{value:.3g}",
                    ha="center",
                    va="center",
                    fontsize=5.5,
                    color="white" if (value - low[j]) / span[j] < 0.5 else "black",
                )
        ax.set_xticks(range(len(STATISTICS)), [label for label, _ in STATISTICS], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(matrix)), [str(row["layer"]) for row in rows_by_lens[lens]], fontsize=6)
        ax.set_ylabel("layer")
        ax.set_title(lens)
    fig.suptitle("Layer x statistic (each column on its own scale, shared across panels)")
    fig.tight_layout()
    save_figure(fig, path)


CURVES: list[tuple[str, list[tuple[str, str | None]], bool]] = [
    ("KL(final || layer), nats", [("KL", "mean_kl_to_final")], True),
    ("agreement with final / top-k", [("agreement", None), ("top-1", None), ("top-5", None)], False),
    ("CE and entropy, nats", [("CE", None), ("entropy", None)], False),
    ("Spearman(Fisher penalty, final CE)", [("Fisher", "spearman_fisher_vs_final_ce")], False),
    ("Spearman(margin penalty, final CE)", [("margin", "spearman_margin_vs_final_ce")], False),
    ("median margin", [("median margin", None)], False),
]
_VALUES: dict[str, Callable[[dict], float]] = {
    "KL": lambda row: row["mean_kl_to_final"],
    "agreement": lambda row: row["agreement_with_final"],
    "top-1": lambda row: row["target_rank"]["top1_rate"],
    "top-5": lambda row: row["target_rank"]["top5_rate"],
    "CE": lambda row: row["mean_cross_entropy"],
    "entropy": lambda row: row["mean_entropy"],
    "Fisher": lambda row: row["spearman_fisher_vs_final_ce"],
    "margin": lambda row: row["spearman_margin_vs_final_ce"],
    "median margin": lambda row: row["margin_percentiles"]["p50"],
}
_STYLES = ("-", "--", ":")


def plot_lens_curves(path: str | Path, rows_by_lens: dict[str, Sequence[dict]]) -> None:
    """Per-layer curves, one colour per lens (with block-bootstrap bands where the rows have ``intervals``)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), sharex=True)
    for ax, (title, series, log_scale) in zip(axes.flat, CURVES):
        for color, (lens, rows) in enumerate(rows_by_lens.items()):
            layers = [row["layer"] for row in rows]
            for style, (name, interval_key) in zip(_STYLES, series):
                values = [_VALUES[name](row) for row in rows]
                label = lens if len(series) == 1 else f"{lens}: {name}"
                ax.plot(
                    layers,
                    values,
                    _STYLES[0] if len(series) == 1 else style,
                    color=f"C{color}",
                    marker=".",
                    label=label,
                )
                bands = [row.get("intervals", {}).get(interval_key) for row in rows] if interval_key else []
                if bands and all(band is not None for band in bands):
                    ax.fill_between(
                        layers, [b[0] for b in bands], [b[1] for b in bands], color=f"C{color}", alpha=0.2, lw=0
                    )
        if log_scale:
            ax.set_yscale("symlog", linthresh=1e-3)
        if title.startswith("Spearman"):
            ax.axhline(0, color="k", lw=0.8)
        ax.set_title(title, fontsize=9)
        legend(ax, fontsize=7)
        ax.grid(True, alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("layer (0-based decoder block; last = final)")
    fig.suptitle("Layer-wise geometry: " + " vs ".join(rows_by_lens))
    save_figure(fig, path)


def plot_lens_figures(output_dir: str | Path, rows_by_lens: dict[str, Sequence[dict]]) -> dict[str, Path]:
    """lens_heatmap.png and lens_curves.png in ``output_dir``; returns their paths by name."""
    output_dir = Path(output_dir)
    paths = {"lens_heatmap": output_dir / "lens_heatmap.png", "lens_curves": output_dir / "lens_curves.png"}
    plot_lens_heatmap(paths["lens_heatmap"], rows_by_lens)
    plot_lens_curves(paths["lens_curves"], rows_by_lens)
    return paths
