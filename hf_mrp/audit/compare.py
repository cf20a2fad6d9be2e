"""The before/after flip audit: two audits of the same positions, compared position by position.

Every number follows the spec's "Before/after audit", "Token breakdowns" and "Calibration"
sections. No model runs here: the inputs are two per-position tables already on disk, the numbers are numpy
(hf_mrp.stats), and the files written are flip_audit.json, its Markdown summary and plots (hf_mrp.reporting).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import MRPUserError
from ..reporting import flip_plots, plots
from ..reporting.markdown import markdown_summary
from ..stats.calibration import expected_calibration_error
from ..stats.flips import FlipNumbers, flip_numbers, flip_sign
from ..stats.token_classes import BUCKETS, CLASSES, HEAD_BUCKET, target_buckets, target_class_codes
from ..storage.files import ensure_output_dir, write_json, write_text
from .geometry import AuditResult
from .integrity import load_whole_audit

MARGIN_BANDS = ("<0.5", "0.5-1", "1-2", "2-5", ">=5")
MARGIN_BAND_EDGES = (0.5, 1.0, 2.0, 5.0)  # band = searchsorted(edges, m, side="right"): [lo, hi)
SAME_BLOCKS_FIX = (
    "audit both models on the same blocks: pass the same data arguments (--dataset, --dataset_config, --split, "
    "--text_column, --block_size, --max_positions) to both audits, with models that share a tokenizer, "
    "or re-audit the before model on the after audit's blocks"
)


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


def check_same_positions(before: AuditResult, after: AuditResult) -> None:
    """Refuse two audits of different positions: a flip only means something at the same position."""
    problems = []
    if before.blocks.fingerprint() != after.blocks.fingerprint():
        problems.append("the token blocks differ (blocks.npy fingerprints)")
    if before.blocks.n_positions != after.blocks.n_positions:
        problems.append(f"n_positions differs ({before.blocks.n_positions} vs {after.blocks.n_positions})")
    for column in ("block", "position", "target_id"):
        b, a = np.asarray(before.positions[column]), np.asarray(after.positions[column])
        if b.shape != a.shape or not np.array_equal(b, a):
            problems.append(f"the {column} columns of positions.parquet differ")
    if problems:
        raise MRPUserError(f"the two audits are not of the same positions: {'; '.join(problems)}; {SAME_BLOCKS_FIX}")


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


def _decode_all(ids: np.ndarray, decode: Callable[[int], str]) -> dict[int, str]:
    """Each distinct id decoded once (tokenizers are slow per call)."""
    return {int(token): decode(int(token)) for token in np.unique(ids)}


def class_breakdown(pair: Pair, class_code: np.ndarray, numbers: FlipNumbers) -> dict:
    """Flips by token class of the decoded target, with each class's share of the overall net."""
    return {
        label: {**group_flips(pair, class_code == c), "share_of_net": numbers.share_of_net[label]}
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


def compare_audits(
    before: AuditResult,
    after: AuditResult,
    decode: Callable[[int], str] | None = None,
    top_tokens: int = 20,
) -> dict:
    """Every before/after quantity as JSON-safe numbers; ``by_class`` is None without ``decode``."""
    check_same_positions(before, after)
    pair = Pair.from_audits(before, after)
    if pair.target.size == 0:
        raise MRPUserError("the audits hold no positions; audit with a larger --max_positions")
    texts = _decode_all(pair.target, decode) if decode is not None else None
    bucket = target_buckets(before.blocks.input_ids, pair.target)
    class_code = target_class_codes(pair.target, texts.__getitem__) if texts is not None else None
    numbers = pair.numbers(bucket == HEAD_BUCKET, class_code)
    return {
        "n_positions": int(pair.target.size),
        "blocks_sha256": before.blocks.fingerprint(),
        **flip_summary(pair, numbers),
        **margin_summary(pair, numbers),
        "accuracy_by_margin_band": margin_bands(pair),
        "accuracy_by_own_margin_band": own_margin_bands(pair),
        "gap_fit_before": before.summary.gap_fit.to_dict(),
        "gap_fit_after": after.summary.gap_fit.to_dict(),
        **frequency_breakdown(pair, bucket, numbers),
        "by_class": class_breakdown(pair, class_code, numbers) if class_code is not None else None,
        **token_extremes(pair, texts, top_tokens),
        **calibration(before, after),
    }


def write_comparison(result: dict, before: AuditResult, after: AuditResult, output_dir: str | Path) -> dict[str, Path]:
    """flip_audit.json/.md and the four PNGs; the JSON goes last, so its presence marks a complete report."""
    output_dir = ensure_output_dir(output_dir)
    files = {
        "markdown": output_dir / "flip_audit.md",
        "margins": output_dir / "margins_overlay.png",
        "gap_curves": output_dir / "gap_curves.png",
        "net_by_bucket": output_dir / "net_by_bucket.png",
        "json": output_dir / "flip_audit.json",
    }
    write_text(files["markdown"], markdown_summary(result))
    plots.plot_margin_histograms(
        files["margins"],
        {"before": before.positions["margin"], "after": after.positions["margin"]},
        title="Decision margins, before vs after",
    )
    plots.plot_gap_curves(
        files["gap_curves"], {"before": before.summary.gap_fit.to_dict(), "after": after.summary.gap_fit.to_dict()}
    )
    flip_plots.plot_net_bars(
        files["net_by_bucket"],
        result["by_bucket"],
        "Flips by target frequency bucket",
        "count of the target token in the blocks",
    )
    if result.get("by_class") is not None:
        files["net_by_class"] = output_dir / "net_by_class.png"
        flip_plots.plot_net_bars(
            files["net_by_class"],
            result["by_class"],
            "Flips by target token class",
            "class of the decoded target token",
        )
    write_json(files["json"], result)
    return files


def decoder_from_tokenizer(tokenizer) -> Callable[[int], str]:
    """``tokenizer.decode([id])``, with the word-initial space SentencePiece drops restored.

    Token classes tell a word start (" running") from a fragment ("ing") by that space; a
    SentencePiece tokenizer decodes "▁running" alone as "running", so the marker puts it back.
    """
    to_piece = getattr(tokenizer, "convert_ids_to_tokens", None)

    def decode(token_id: int) -> str:
        text = tokenizer.decode([token_id])
        piece = to_piece(token_id) if to_piece is not None else None
        if isinstance(piece, str) and piece.startswith("\u2581") and not text[:1].isspace():
            text = " " + text
        return text

    return decode


def compare_dirs(
    before_dir: str | Path, after_dir: str | Path, output_dir: str | Path, tokenizer=None, top_tokens: int = 20
) -> dict:
    """Load two audit folders, compare them, write the report into ``output_dir`` and return the numbers."""
    output_dir = ensure_output_dir(output_dir)
    before, after = load_whole_audit(before_dir), load_whole_audit(after_dir)
    decode = decoder_from_tokenizer(tokenizer) if tokenizer is not None else None
    result = compare_audits(before, after, decode, top_tokens)
    write_comparison(result, before, after, output_dir)
    return result
