"""The paper's published numbers, and a table that puts each sweep row next to them in the same units.

Sources (github.com/mellowmarshall/mrp-paper): the paper's text for Fisher lambda 0.15 / 0.3 and
margin-max R->W; its released flip audits results/run11_fisher_0.6 and results/run12_fisher_1.0
(token_class_flip_audit.json, "overall" and "by_class"). Qwen3.5-4B-Base, full model, 256,577
WikiText-103 validation positions audited in-sample, one seed, no control. Counts become rates per
1,000 positions so that they compare with any audit size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..sweep.results import MetricSummary, PairedDifference, Row

PAPER_POSITIONS = 256_577
PAPER_MODEL = "Qwen3.5-4B-Base (full model, 256,577 WikiText-103 positions, in-sample, one seed, no control)"
PAPER_RUNS: dict[tuple[str, float], dict[str, float]] = {
    ("fisher", 0.15): {"w2r": 16_195, "r2w": 5_317, "median_margin_change": 0.139},
    ("fisher", 0.3): {"w2r": 16_256, "r2w": 5_298, "median_margin_change": 0.184},
    ("fisher", 0.6): {
        "w2r": 16_327,
        "r2w": 5_356,
        "median_margin_change": 1.316914 / 1.030457 - 1.0,
        "accuracy_change": 0.513849643576782 - 0.471090549815455,
        "structural_share": 7_231 / 10_971,
    },
    ("fisher", 1.0): {
        "w2r": 14_912,
        "r2w": 4_994,
        "median_margin_change": 1.350311 / 1.030457 - 1.0,
        "accuracy_change": 0.5097456124282379 - 0.471090549815455,
        "structural_share": 7_001 / 9_918,
    },
    ("margin", 0.1): {"r2w": 5_716},
    ("margin", 0.3): {"r2w": 7_910},
    ("margin", 1.0): {"r2w": 39_108},
}
QUANTITIES = ("w2r", "r2w", "median_margin_change", "accuracy_change", "structural_share")
LABELS = {
    "w2r": "W->R per 1,000",
    "r2w": "R->W per 1,000",
    "median_margin_change": "median margin change",
    "accuracy_change": "accuracy change",
    "structural_share": "structural share of net",
}


def _scaled(entry: MetricSummary | PairedDifference | None, scale: float) -> tuple[float | None, list[float] | None]:
    if entry is None or entry.mean is None:
        return None, None
    ci = entry.ci
    return entry.mean * scale, None if ci is None else [ci[0] * scale, ci[1] * scale]


def _cell(value: float | None, ci: list[float] | None, quantity: str) -> str:
    if value is None:
        return "n/a"
    formats = {
        "median_margin_change": lambda v: f"{100 * v:+.1f}%",
        "accuracy_change": lambda v: f"{100 * v:+.2f} pp",
        "structural_share": lambda v: f"{100 * v:.1f}%",
    }
    fmt = formats.get(quantity, lambda v: f"{v:.1f}")
    return fmt(value) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def _ours(row: Row, quantity: str, n_positions: int, baseline_accuracy: float) -> tuple[str, str]:
    """(this row, this row minus its control), in the paper's units."""
    metrics, paired = row.metrics, row.vs_control or {}
    if quantity in ("w2r", "r2w"):
        scale = 1000.0 / n_positions
        return _cell(*_scaled(metrics.get(quantity), scale), quantity), _cell(
            *_scaled(paired.get(quantity), scale), quantity
        )
    if quantity == "accuracy_change":
        entry = metrics.get("accuracy")
        value, ci = _scaled(entry, 1.0)
        return _cell(
            None if value is None else value - baseline_accuracy,
            None if ci is None else [ci[0] - baseline_accuracy, ci[1] - baseline_accuracy],
            quantity,
        ), _cell(*_scaled(paired.get("accuracy"), 1.0), quantity)
    return _cell(*_scaled(metrics.get(quantity), 1.0), quantity), _cell(*_scaled(paired.get(quantity), 1.0), quantity)


def paper_comparison_rows(rows: list[Row], n_positions: int, baseline_accuracy: float) -> list[list[str]]:
    """[row, lambda, quantity, paper, this row [CI], this row minus its control [paired CI]] for every plain
    sweep row with a published paper number at the same objective and lambda."""
    table = []
    for row in rows:
        paper = PAPER_RUNS.get((row.objective, float(row.lam)))
        if row.variant or paper is None:
            continue
        for quantity in QUANTITIES:
            if quantity not in paper:
                continue
            scale = 1000.0 / PAPER_POSITIONS if quantity in ("w2r", "r2w") else 1.0
            ours, attributable = _ours(row, quantity, n_positions, baseline_accuracy)
            table.append(
                [
                    row.objective,
                    f"{row.lam:g}",
                    LABELS[quantity],
                    _cell(paper[quantity] * scale, None, quantity),
                    ours,
                    attributable,
                ]
            )
    return table


__all__ = ["PAPER_RUNS", "PAPER_POSITIONS", "PAPER_MODEL", "paper_comparison_rows"]
