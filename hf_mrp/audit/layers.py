"""Layer-wise geometry through a lens (logit lens: each layer's hidden state through the final norm and W; tuned
lens: through a trained affine translator first), from the per-position columns of one chunked float32 pass."""

from __future__ import annotations

import numpy as np

from ..ops import fit_gap_law
from ..stats.correlation import spearman
from ..stats.intervals import percentile_interval
from ..stats.resampling import BlockIndex, block_bootstrap_distribution

INTERVAL_STATISTICS = ("spearman_fisher_vs_final_ce", "spearman_margin_vs_final_ce", "mean_kl_to_final")

PERCENTILES = (5, 25, 50, 75, 95)  # the margin percentiles an audit reports, as p05 ... p95


def margin_percentiles(margin: np.ndarray) -> dict[str, float]:
    """{"p05": ..., "p95": ...}: the one percentile set of the audit summary and of every lens row."""
    return {f"p{q:02d}": float(np.percentile(margin, q)) for q in PERCENTILES}


GAP_RESAMPLES = 1000  # block-bootstrap resamples of audit.json's correct_wrong_gap (seed 0)


def correct_wrong_gap(positions: dict[str, np.ndarray], n_resamples: int = GAP_RESAMPLES, seed: int = 0) -> dict:
    """audit.json's ``correct_wrong_gap``: the mean margin of the correct predictions minus that of the wrong ones
    (the base paper's separation of the two), with its 95% block-bootstrap interval (whole blocks resampled, as
    every audit interval: docs/spec.md "Intervals"). ``gap`` and the interval are null where a group is empty;
    a resample that draws no position of one group is left out of the interval."""
    margin = positions["margin"].astype(np.float64)
    correct = positions["correct"].astype(bool)

    def gap(index: np.ndarray) -> float:
        chosen, right = margin[index], correct[index]
        if right.all() or not right.any():
            return float("nan")
        return float(chosen[right].mean() - chosen[~right].mean())

    whole = gap(np.arange(margin.size))
    found: dict = {
        "gap": None if np.isnan(whole) else whole,
        "mean_margin_correct": float(margin[correct].mean()) if correct.any() else None,
        "mean_margin_wrong": float(margin[~correct].mean()) if not correct.all() else None,
        "interval": None,
        "n_resamples": n_resamples,
        "seed": seed,
    }
    if found["gap"] is not None and n_resamples > 0:
        samples = block_bootstrap_distribution(gap, BlockIndex.from_labels(positions["block"]), n_resamples, seed)
        low, high = percentile_interval(samples)
        found["interval"] = [float(low), float(high)]
    return found


def summarize_layers(
    per_layer: dict[int, dict[str, np.ndarray]],
    final_ce: np.ndarray,
    block_of: np.ndarray | None = None,
    n_resamples: int = 0,
    seed: int = 0,
) -> list[dict]:
    """Per layer: accuracy, margin percentiles, Spearman(layer penalty, final-layer CE) over positions, then the
    lens statistics (KL to the final layer, top-1 agreement with it, the target's rank, entropy, CE, gap fit).

    With ``n_resamples`` > 0 and ``block_of`` (each position's block), each row also gets 95% block-bootstrap
    intervals (``intervals``) of the two Spearman correlations and of the mean KL, all layers on the same
    resamples (neighbouring positions of a block are correlated: resampling single positions is too narrow).
    """
    rows = []
    for layer, columns in sorted(per_layer.items()):
        margin = columns["margin"].astype(np.float64)
        rows.append(
            {
                "layer": int(layer),
                "accuracy": float(columns["correct"].mean()),
                "margin_percentiles": margin_percentiles(margin),
                "spearman_fisher_vs_final_ce": spearman(columns["fisher_penalty"], final_ce),
                "spearman_margin_vs_final_ce": spearman(columns["margin_penalty"], final_ce),
                **lens_row(columns),
            }
        )
    if n_resamples > 0 and block_of is not None and rows:
        for row, intervals in zip(rows, layer_intervals(per_layer, final_ce, block_of, n_resamples, seed)):
            row["intervals"] = intervals
    return rows


def lens_row(columns: dict[str, np.ndarray]) -> dict:
    """The lens statistics of one layer: means over positions, the target's rank, the gap-law fit of its margins
    (its ``curve`` left out; values are null where the fit is undefined)."""
    rank = columns["target_rank"].astype(np.int64)
    fit = fit_gap_law(columns["margin"]).to_dict()
    fit.pop("curve")
    return {
        "mean_kl_to_final": float(columns["kl_to_final"].astype(np.float64).mean()),
        "agreement_with_final": float(columns["agrees_with_final"].mean()),
        "target_rank": {
            "median": float(np.median(rank)),
            "top1_rate": float((rank <= 1).mean()),
            "top5_rate": float((rank <= 5).mean()),
        },
        "mean_entropy": float(columns["entropy"].astype(np.float64).mean()),
        "mean_cross_entropy": float(-columns["target_logprob"].astype(np.float64).mean()),
        "gap_fit": fit,
    }


def _interval_statistics(
    per_layer: dict[int, dict[str, np.ndarray]], final_ce: np.ndarray, index: np.ndarray, layers: list[int]
) -> np.ndarray:
    """[layers x INTERVAL_STATISTICS] on the positions ``index`` of one resample."""
    ce = final_ce[index]
    return np.array(
        [
            [
                spearman(per_layer[layer]["fisher_penalty"][index], ce),
                spearman(per_layer[layer]["margin_penalty"][index], ce),
                per_layer[layer]["kl_to_final"][index].astype(np.float64).mean(),
            ]
            for layer in layers
        ]
    )


def layer_intervals(
    per_layer: dict[int, dict[str, np.ndarray]],
    final_ce: np.ndarray,
    block_of: np.ndarray,
    n_resamples: int,
    seed: int = 0,
) -> list[dict[str, list[float]]]:
    """For each layer (sorted), {statistic: [low, high]}: 95% percentile intervals under the block bootstrap."""
    layers = sorted(per_layer)
    samples = block_bootstrap_distribution(
        lambda index: _interval_statistics(per_layer, final_ce, index, layers),
        BlockIndex.from_labels(block_of),
        n_resamples,
        seed,
    )
    interval = percentile_interval(samples)
    low, high = np.asarray(interval.low), np.asarray(interval.high)  # [layers x statistics]
    return [
        {name: [float(low[i, j]), float(high[i, j])] for j, name in enumerate(INTERVAL_STATISTICS)}
        for i in range(len(layers))
    ]


def layer_summary(rows: list[dict], lens: str) -> dict:
    """audit.json's "layers" entry: the lens, the layers, and those with a negative penalty-vs-CE correlation."""
    return {
        "selected": [row["layer"] for row in rows],
        "negative_fisher_correlation": [row["layer"] for row in rows if row["spearman_fisher_vs_final_ce"] < 0],
        "negative_margin_correlation": [row["layer"] for row in rows if row["spearman_margin_vs_final_ce"] < 0],
        "lens": lens,
    }
