"""The flip arithmetic of a before/after audit pair (docs/spec.md, "Before/after audit", "Token breakdowns").

One home for the numbers `hf-mrp compare` reports (audit/compare.py), the callback logs (through compare) and
the sweep tabulates for every run and every bootstrap resample (sweep/run_statistics.py): W->R, R->W, net, flip
ratio, churn, accuracy, median margins and their change, head share, and net by token class with each class's
share of the net. Numpy only: the inputs are per-position columns already on disk.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from .token_classes import CLASSES


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator as a float, None where undefined (JSON null, never NaN)."""
    return float(numerator) / float(denominator) + 0.0 if denominator else None  # + 0.0: no "-0.0"


def finite_or_none(value) -> float | None:
    """A float for JSON: NaN and infinities (undefined statistics) become None."""
    value = float(value)
    return value if np.isfinite(value) else None


def none_to_nan(value: float | None) -> float:
    """The inverse for numeric tables: an undefined number (None) becomes NaN."""
    return float("nan") if value is None else float(value)


def flip_sign(correct_before: np.ndarray, correct_after: np.ndarray) -> np.ndarray:
    """+1 where a position went wrong -> right (W->R), -1 where right -> wrong (R->W), else 0 (int8)."""
    before, after = np.asarray(correct_before, dtype=bool), np.asarray(correct_after, dtype=bool)
    return (~before & after).astype(np.int8) - (before & ~after).astype(np.int8)


def relative_median_margin_change(median_before: float, median_after: float) -> float | None:
    """The paper's median change median(m after) / median(m before) - 1 (None when the median before is 0); in
    JSON "median_margin_change". Not the median of the per-position changes (flip_tables.py's rotation
    and expansion numbers)."""
    return median_after / median_before - 1.0 if median_before else None


JSON_KEYS = {"relative_median_margin_change": "median_margin_change"}  # attribute -> its JSON key, where they differ


@dataclass
class FlipNumbers:
    """Every flip number of one before/after pair of the same positions (see `flip_numbers`)."""

    w2r: int
    r2w: int
    net: int
    flip_ratio: float | None
    churn: float
    accuracy_before: float
    accuracy_after: float
    median_margin_before: float
    median_margin_after: float
    relative_median_margin_change: float | None
    head_share: float | None
    net_by_class: dict[str, int] | None = None  # with class codes only
    share_of_net: dict[str, float | None] | None = None

    def to_json(self) -> dict[str, Any]:
        """The numbers under their JSON keys (the class numbers only when computed)."""
        data = {JSON_KEYS.get(field.name, field.name): getattr(self, field.name) for field in dataclasses.fields(self)}
        if self.net_by_class is None:
            del data["net_by_class"], data["share_of_net"]
        return data


def flip_numbers(
    correct_before: np.ndarray,
    correct_after: np.ndarray,
    margin_before: np.ndarray,
    margin_after: np.ndarray,
    top1_before: np.ndarray,
    top1_after: np.ndarray,
    head: np.ndarray,
    class_code: np.ndarray | None = None,
) -> FlipNumbers:
    """Every flip number of one before/after pair of the same positions.

    ``head``: whether each position's target is in the 100+ frequency bucket; ``class_code``: index into
    CLASSES of each decoded target (None: no class numbers). Counts are ints, the rest floats or None where
    undefined (flip ratio without R->W, shares without net, a change from a zero median).
    """
    sign = flip_sign(correct_before, correct_after)
    w2r, r2w = int(np.count_nonzero(sign == 1)), int(np.count_nonzero(sign == -1))
    net = w2r - r2w
    median_before, median_after = float(np.median(margin_before)), float(np.median(margin_after))
    numbers = FlipNumbers(
        w2r=w2r,
        r2w=r2w,
        net=net,
        flip_ratio=ratio(w2r, r2w),
        churn=float(np.mean(np.asarray(top1_before) != np.asarray(top1_after))),
        accuracy_before=float(np.mean(np.asarray(correct_before, dtype=bool))),
        accuracy_after=float(np.mean(np.asarray(correct_after, dtype=bool))),
        median_margin_before=median_before,
        median_margin_after=median_after,
        relative_median_margin_change=relative_median_margin_change(median_before, median_after),
        head_share=ratio(int(sign[np.asarray(head, dtype=bool)].sum()), net),
    )
    if class_code is not None:
        by_class = np.bincount(class_code, weights=sign, minlength=len(CLASSES)).astype(np.int64)
        numbers.net_by_class = {label: int(by_class[c]) for c, label in enumerate(CLASSES)}
        numbers.share_of_net = {label: ratio(by_class[c], net) for c, label in enumerate(CLASSES)}
    return numbers


__all__ = [
    "ratio",
    "finite_or_none",
    "none_to_nan",
    "flip_sign",
    "relative_median_margin_change",
    "FlipNumbers",
    "flip_numbers",
]
