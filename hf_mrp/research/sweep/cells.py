"""How one number of a sweep is printed in a table cell of results.md: a row's mean with its interval, its spread
over seeds, a paired difference with both intervals. Numbers by reporting.markdown's formats (metrics.KINDS)."""

from __future__ import annotations

import math

from ...reporting.markdown import escape_cell, fmt_kind
from .metrics import KINDS
from .plan import format_lambda
from .results import MetricSummary, PairedDifference, Row


def row_cells(row: Row) -> list[str]:
    """The row's label and lambda: the first two cells of every row table."""
    return [escape_cell(row.label), format_lambda(row.lam)]


def cell_ci(entry: MetricSummary | None, key: str) -> str:
    """mean [block-bootstrap CI]."""
    if entry is None:
        return "-"
    text = fmt_kind(entry.mean, KINDS[key])
    if entry.ci:
        text += f" [{fmt_kind(entry.ci[0], KINDS[key])}, {fmt_kind(entry.ci[1], KINDS[key])}]"
    return text


def cell_spread(entry: MetricSummary | None, key: str) -> str:
    """std over seeds; min to max. A std of counts keeps one decimal; of shares, percentage points."""
    if entry is None:
        return "-"
    kind = KINDS[key]
    if entry.std is None:
        std = "n/a"
    elif kind in ("count", "signed_count"):
        std = f"{entry.std:,.1f}"
    elif kind in ("percent", "signed_percent"):
        std = f"{100 * entry.std:.1f} pp"
    else:
        std = fmt_kind(entry.std, kind)
    return f"{std}; {fmt_kind(entry.min, kind)} to {fmt_kind(entry.max, kind)}"


def fmt_difference(value: float | None, key: str) -> str:
    """A difference of two runs' metric: signed counts, percentage points for shares, signed numbers."""
    if value is None or not math.isfinite(value):
        return "n/a"
    kind = KINDS[key]
    if kind in ("count", "signed_count"):
        return fmt_kind(value, "signed_count")
    if kind in ("percent", "signed_percent"):
        return f"{100 * value:+.2f} pp"
    return f"{value:+.4g}"


def cell_paired(entry: PairedDifference | None, key: str) -> str:
    """mean [paired block-bootstrap CI] {seed t CI}."""
    if entry is None:
        return "-"
    text = fmt_difference(entry.mean, key)
    if entry.ci:
        text += f" [{fmt_difference(entry.ci[0], key)}, {fmt_difference(entry.ci[1], key)}]"
    if entry.seed_ci:
        text += f" {{{fmt_difference(entry.seed_ci[0], key)}, {fmt_difference(entry.seed_ci[1], key)}}}"
    return text


__all__ = ["row_cells", "cell_ci", "cell_spread", "fmt_difference", "cell_paired"]
