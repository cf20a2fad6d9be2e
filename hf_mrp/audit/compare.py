"""The before/after flip audit: two audits of the same positions, compared position by position.

No model runs here: the inputs are two per-position tables already on disk (or in memory), checked to be of the
same positions; the tables are flip_tables' (numpy, hf_mrp.stats), and the files written are flip_audit.json, its
Markdown summary and plots (hf_mrp.reporting).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import MRPUserError
from ..reporting import flip_plots, manifold_plots, plots
from ..reporting.markdown import markdown_summary
from ..stats.token_classes import HEAD_BUCKET, target_buckets, target_class_codes
from ..storage.files import ensure_output_dir, write_json, write_text
from .flip_tables import (
    Pair,
    calibration,
    class_breakdown,
    flip_summary,
    frequency_breakdown,
    margin_bands,
    margin_summary,
    own_margin_bands,
    token_extremes,
)
from .geometry import AuditResult
from .integrity import load_whole_audit

SAME_BLOCKS_FIX = (
    "audit both models on the same blocks: pass the same data arguments (--dataset, --dataset_config, --split, "
    "--text_column, --block_size, --max_positions) to both audits, with models that share a tokenizer, "
    "or re-audit the before model on the after audit's blocks"
)


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


def _decode_all(ids: np.ndarray, decode: Callable[[int], str]) -> dict[int, str]:
    """Each distinct id decoded once (tokenizers are slow per call)."""
    return {int(token): decode(int(token)) for token in np.unique(ids)}


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
    shares = numbers.share_of_net  # measured exactly when the classes are (class_code given)
    by_class = class_breakdown(pair, class_code, shares) if class_code is not None and shares is not None else None
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
        "by_class": by_class,
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
    if all(audit.layers and "participation_ratio" in audit.layers[0] for audit in (before, after)):
        files["manifold"] = output_dir / "manifold.png"  # both audits measured the manifold: one picture of the two
        manifold_plots.plot_manifold(files["manifold"], {"before": before.layers or [], "after": after.layers or []})
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
