"""Layer-wise geometry (logit lens): each layer's hidden state through the final norm and W."""

from __future__ import annotations

import re

import numpy as np
from scipy.stats import spearmanr

from ..errors import MRPUserError

_RANGE = re.compile(r"^(-?\d+)(?:\s*-\s*(-?\d+))?$")


def parse_layer_spec(spec: str | list[int] | None, n_layers: int) -> list[int]:
    """'all', '20-29', '3,5,7', '-1' or a list -> sorted 0-based layer indices, checked against the model."""
    if spec is None:
        return []
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(n_layers))
        items: list[int] = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            match = _RANGE.match(part)
            if match is None:
                raise MRPUserError(f"bad layer spec {spec!r}; use 'all', a range like '20-29' or a list like '3,5,7'")
            low, high = match.group(1), match.group(2) or match.group(1)
            items.extend(range(int(low), int(high) + 1))
    else:
        items = [int(i) for i in spec]
    if not items:
        raise MRPUserError(f"layer spec {spec!r} selects no layer; use 'all', '20-29' or '3,5,7'")
    resolved = sorted({i + n_layers if i < 0 else i for i in items})
    bad = [i for i in resolved if not 0 <= i < n_layers]
    if bad:
        raise MRPUserError(
            f"layer index {bad[0]} is out of range: the model has {n_layers} layers (0..{n_layers - 1}); "
            "fix the layer spec"
        )
    return resolved


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
