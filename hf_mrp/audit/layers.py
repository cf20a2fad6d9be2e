"""Layer-wise geometry (logit lens): each layer's hidden state through the final norm and W."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr


def summarize_layers(per_layer: dict[int, dict[str, np.ndarray]], final_ce: np.ndarray) -> list[dict]:
    """Per layer: accuracy, margin percentiles, and Spearman(layer penalty, final-layer CE) over positions."""
    rows = []
    for layer, columns in sorted(per_layer.items()):
        margin = columns["margin"].astype(np.float64)
        rows.append(
            {
                "layer": int(layer),
                "accuracy": float(columns["correct"].mean()),
                "margin_percentiles": {f"p{q:02d}": float(np.percentile(margin, q)) for q in (5, 25, 50, 75, 95)},
                "spearman_fisher_vs_final_ce": float(spearmanr(columns["fisher_penalty"], final_ce).statistic),
                "spearman_margin_vs_final_ce": float(spearmanr(columns["margin_penalty"], final_ce).statistic),
            }
        )
    return rows
