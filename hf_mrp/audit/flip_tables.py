"""The before/after tables of two audits of the same positions: flips, margins, margin bands, frequency buckets,
token classes, the tokens that gained and lost most, calibration.

Every table follows the spec's "Before/after audit", "Token breakdowns" and "Calibration" sections and is made of
JSON-safe numbers (None where a mean has no position); ``compare.compare_audits`` assembles them into
flip_audit.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..stats.calibration import expected_calibration_error
from ..stats.flips import FlipNumbers, flip_numbers, flip_sign
from ..stats.token_classes import BUCKETS, CLASSES
from .geometry import AuditResult

MARGIN_BANDS = ("<0.5", "0.5-1", "1-2", "2-5", ">=5")
MARGIN_BAND_EDGES = (0.5, 1.0, 2.0, 5.0)  # band = searchsorted(edges, m, side="right"): [lo, hi)


@dataclass(frozen=True)
class Pair:
    """The two per-position tables, aligned, as the float64/bool arrays every quantity needs."""

    target: np.ndarray
    correct_before: np.ndarray
    correct_after: np.ndarray
    margin_before: np.ndarray
    margin_after: np.ndarray
    top1_before: np.ndarray
    top1_after: np.ndarray
    top2_before: np.ndarray
    top2_after: np.ndarray

    @classmethod
    def from_audits(cls, before: AuditResult, after: AuditResult) -> Pair:
        b, a = before.positions, after.positions
        return cls(
            np.asarray(b["target_id"], dtype=np.int64),
            np.asarray(b["correct"]).astype(bool),
            np.asarray(a["correct"]).astype(bool),
            np.asarray(b["margin"], dtype=np.float64),
            np.asarray(a["margin"], dtype=np.float64),
            np.asarray(b["top1_id"], dtype=np.int64),
            np.asarray(a["top1_id"], dtype=np.int64),
            np.asarray(b["top2_id"], dtype=np.int64),
            np.asarray(a["top2_id"], dtype=np.int64),
        )

    @cached_property
    def sign(self) -> np.ndarray:
        """+1 W->R, -1 R->W, 0 unchanged, per position (stats.flips.flip_sign)."""
        return flip_sign(self.correct_before, self.correct_after)

    def numbers(self, head: np.ndarray, class_code: np.ndarray | None) -> FlipNumbers:
        """The headline flip numbers (hf_mrp.stats.flips, the sweep's too)."""
        return flip_numbers(
            self.correct_before,
            self.correct_after,
            self.margin_before,
            self.margin_after,
            self.top1_before,
            self.top1_after,
            head,
            class_code,
        )


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if values.size else None


def group_flips(pair: Pair, mask: np.ndarray | None = None) -> dict:
    """n, W->R, R->W, net and accuracy before/after over the positions in ``mask`` (all when None)."""
    mask = np.ones(pair.target.size, dtype=bool) if mask is None else mask
    sign = pair.sign[mask]
    w2r, r2w = int(np.count_nonzero(sign == 1)), int(np.count_nonzero(sign == -1))
    return {
        "n": int(mask.sum()),
        "w2r": w2r,
        "r2w": r2w,
        "net": w2r - r2w,
        "accuracy_before": _mean(pair.correct_before[mask]),
        "accuracy_after": _mean(pair.correct_after[mask]),
    }


def flip_summary(pair: Pair, numbers: FlipNumbers) -> dict:
    """Corrections, collateral damage, their ratio, top-1 churn and runner-up rotation."""
    rotated = (pair.top1_before == pair.top1_after) & (pair.top2_before != pair.top2_after)
    return {
        "w2r": numbers.w2r,
        "r2w": numbers.r2w,
        "net": numbers.net,
        "flip_ratio": numbers.flip_ratio,
        "churn": numbers.churn,
        "runner_up_rotation": rotation_summary(pair, rotated),
        "accuracy_before": numbers.accuracy_before,
        "accuracy_after": numbers.accuracy_after,
    }


def rotation_summary(pair: Pair, rotated: np.ndarray) -> dict:
    """Runner-up rotation (top-1 kept, top-2 changed): its share, and among the rotated positions the
    share whose margin widened and the mean and median margin change (the paper's rotation table)."""
    change = (pair.margin_after - pair.margin_before)[rotated]
    median_rotated_change = float(np.median(change)) if change.size else None  # m after - m before, rotated only
    return {
        "share": float(rotated.mean()),
        "widened_share": _mean(change > 0),
        "mean_margin_change": _mean(change),
        "median_margin_change": median_rotated_change,
    }


def margin_summary(pair: Pair, numbers: FlipNumbers) -> dict:
    """Median margins, the paper's median change, and the per-position expansion."""
    change = pair.margin_after - pair.margin_before
    return {
        "median_margin_before": numbers.median_margin_before,
        "median_margin_after": numbers.median_margin_after,
        "median_margin_change": numbers.relative_median_margin_change,
        "expansion": {
            "share_wider": float(np.mean(change > 0)),
            "mean_change": float(np.mean(change)),
            "median_change": float(np.median(change)),
        },
    }


def margin_band_index(margins: np.ndarray) -> np.ndarray:
    """Index into MARGIN_BANDS of each margin (bands are half-open [lo, hi))."""
    return np.searchsorted(np.asarray(MARGIN_BAND_EDGES), margins, side="right")


def margin_bands(pair: Pair) -> dict:
    """Flips and accuracy by the BEFORE margin band (fixed rows): where the corrections happen."""
    band = margin_band_index(pair.margin_before)
    return {label: group_flips(pair, band == index) for index, label in enumerate(MARGIN_BANDS)}


def own_margin_bands(pair: Pair) -> dict:
    """Accuracy with each model binned by its OWN margin (the paper's convention): a band's positions
    before and after differ, so each side has its own count; flips are not defined per band here."""
    before, after = margin_band_index(pair.margin_before), margin_band_index(pair.margin_after)
    return {
        label: {
            "n_before": int(np.count_nonzero(before == index)),
            "n_after": int(np.count_nonzero(after == index)),
            "accuracy_before": _mean(pair.correct_before[before == index]),
            "accuracy_after": _mean(pair.correct_after[after == index]),
        }
        for index, label in enumerate(MARGIN_BANDS)
    }


def frequency_breakdown(pair: Pair, bucket: np.ndarray, numbers: FlipNumbers) -> dict:
    """Flips by the target's count among all tokens of the blocks, and the head share net(100+)/net(all)."""
    return {
        "by_bucket": {label: group_flips(pair, bucket == label) for label in BUCKETS},
        "head_share": numbers.head_share,
    }


def class_breakdown(pair: Pair, class_code: np.ndarray, share_of_net: dict[str, float | None]) -> dict:
    """Flips by token class of the decoded target, with each class's share of the overall net (FlipNumbers')."""
    return {
        label: {**group_flips(pair, class_code == c), "share_of_net": share_of_net[label]}
        for c, label in enumerate(CLASSES)
    }


def token_extremes(pair: Pair, texts: dict[int, str] | None, limit: int = 20) -> dict:
    """The target tokens with the largest per-token net gain and net loss (ties: more flips, lower id)."""
    ids, inverse = np.unique(pair.target, return_inverse=True)
    sign = pair.sign
    w2r = np.bincount(inverse, sign == 1, ids.size).astype(np.int64)
    r2w = np.bincount(inverse, sign == -1, ids.size).astype(np.int64)
    net = w2r - r2w

    def rows(order: np.ndarray, keep: np.ndarray) -> list[dict]:
        chosen = [i for i in order if keep[i]][:limit]
        return [
            {
                "token_id": int(ids[i]),
                "token": texts[int(ids[i])] if texts is not None else None,
                "w2r": int(w2r[i]),
                "r2w": int(r2w[i]),
                "net": int(net[i]),
            }
            for i in chosen
        ]

    return {
        "top_gain": rows(np.lexsort((ids, -w2r, -net)), net > 0),
        "top_loss": rows(np.lexsort((ids, -r2w, net)), net < 0),
    }


def calibration(before: AuditResult, after: AuditResult) -> dict:
    """ECE (ECE_BINS equal-width bins of p_top1) and mean Brier score, before and after."""
    result = {}
    for name, audit in (("before", before), ("after", after)):
        positions = audit.positions
        correct = np.asarray(positions["correct"]).astype(bool)
        result[f"ece_{name}"] = expected_calibration_error(positions["p_top1"], correct)
        result[f"brier_{name}"] = float(np.mean(np.asarray(positions["brier"], dtype=np.float64)))
    return result
