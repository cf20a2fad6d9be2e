"""What MRPAuditCallback shows on the console: a compact table of the audit at train begin and train end (one line
at each evaluation), and the Trainer's console without the audit's scalars.

The Trainer's console callbacks (ProgressCallback, or PrinterCallback with ``disable_tqdm``) print the whole dict
of every ``trainer.log`` call: the audit's ~60 scalars (``audit/class/<class>/w2r``, ``audit/bucket/100+/net``,
...) made one line of ~1,300 characters at each audit. Those scalars are for the trackers (TensorBoard, trackio,
W&B: docs/logging.md lists them), which still get every one through ``trainer.log``; the console callbacks are
swapped, in place, for subclasses that leave the ``audit/*`` keys out, and the table says the same in rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

from ..audit.geometry import AuditResult
from ..reporting.markdown import flip_summary_line
from ..stats.calibration import expected_calibration_error
from ..stats.token_classes import CLASSES, target_class_codes

AUDIT_PREFIX = "audit/"
BOOKKEEPING = frozenset({"epoch", "step"})  # what trainer.log adds to every dict


def without_audit(logs: dict | None) -> dict | None:
    """``logs`` less its ``audit/*`` scalars; None when nothing but bookkeeping is left (nothing to print)."""
    kept = {key: value for key, value in (logs or {}).items() if not key.startswith(AUDIT_PREFIX)}
    return kept if set(kept) - BOOKKEEPING else None


class AuditQuietProgressCallback(ProgressCallback):
    """The Trainer's progress bar, whose log lines leave out the audit's scalars (the table shows them)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        kept = without_audit(logs)
        if kept is not None:
            super().on_log(args, state, control, logs=kept, **kwargs)


class AuditQuietPrinterCallback(PrinterCallback):
    """The Trainer's printer (``disable_tqdm``), leaving out the audit's scalars (the table shows them)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        kept = without_audit(logs)
        if kept is not None:
            super().on_log(args, state, control, logs=kept, **kwargs)


QUIET_CONSOLE: dict[type, type[TrainerCallback]] = {
    ProgressCallback: AuditQuietProgressCallback,
    PrinterCallback: AuditQuietPrinterCallback,
}


def hide_audit_from_console(callbacks: list) -> None:
    """Swap, in place, the Trainer's own console callbacks (exactly those classes: a user's own is left alone)
    for their audit-quiet subclasses, which keep their settings and stay instances of the originals."""
    for index, callback in enumerate(callbacks):
        quiet = QUIET_CONSOLE.get(type(callback))
        if quiet is not None:
            replacement = object.__new__(quiet)
            replacement.__dict__.update(callback.__dict__)
            callbacks[index] = replacement


def console_write(text: str) -> None:
    """Print ``text`` above the Trainer's progress bar, which is redrawn under it (tqdm.write; a plain print
    when no bar is open)."""
    from tqdm.auto import tqdm

    tqdm.write(text)


COLUMNS = ("class", "positions", "W->R", "R->W", "net", "accuracy", "median margin", "ECE")
WIDTHS = (10, 9, 6, 6, 6, 16, 16, 16)


def _group_numbers(audit: AuditResult, mask: np.ndarray) -> tuple[float, float, float]:
    """Accuracy, median margin and ECE of the positions in ``mask``."""
    positions = audit.positions
    correct = np.asarray(positions["correct"]).astype(bool)[mask]
    margin = np.asarray(positions["margin"], dtype=np.float64)[mask]
    ece = expected_calibration_error(np.asarray(positions["p_top1"])[mask], correct)
    return float(correct.mean()), float(np.median(margin)), ece


def _cell(digits: int, after: float, before: float | None) -> str:
    return f"{after:.{digits}f}" if before is None else f"{before:.{digits}f} -> {after:.{digits}f}"


def _row(label, n, flips, numbers, numbers_before) -> str:
    counts = [str(flips[key]) for key in ("w2r", "r2w", "net")] if flips is not None else ["-"] * 3
    cells = [
        _cell(digits, value, None if numbers_before is None else numbers_before[index])
        for index, (digits, value) in enumerate(zip((4, 3, 4), numbers))
    ]
    values = (label, str(n), *counts, *cells)
    return "  ".join(
        value.ljust(width) if column == 0 else value.rjust(width)
        for column, (value, width) in enumerate(zip(values, WIDTHS))
    ).rstrip()


def audit_table(
    title: str,
    audit: AuditResult,
    class_code: np.ndarray | None = None,
    before: AuditResult | None = None,
    comparison: dict | None = None,
) -> str:
    """The audit as a few rows: every position, then each token class that has positions. With ``before`` and
    ``comparison`` (the flip audit of ``before`` -> ``audit``): the flips, and accuracy, median margin and ECE as
    before -> after; without them, the flip columns are '-' (an audit has no flips against itself)."""
    n = int(np.asarray(audit.positions["margin"]).size)
    groups: list[tuple[str, np.ndarray, dict | None]] = [("all", np.ones(n, dtype=bool), comparison)]
    if class_code is not None:
        by_class = (comparison or {}).get("by_class") or {}
        groups += [(label, class_code == code, by_class.get(label)) for code, label in enumerate(CLASSES)]
    lines = [title, "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(COLUMNS, WIDTHS)))]
    for label, mask, flips in groups:
        if mask.any():
            numbers_before = _group_numbers(before, mask) if before is not None else None
            flipped = flips if comparison is not None else None
            lines.append(_row(label, int(mask.sum()), flipped, _group_numbers(audit, mask), numbers_before))
    return "\n".join(lines)


def class_codes(audit: AuditResult, decode: Callable[[int], str] | None) -> np.ndarray | None:
    """Each audited position's token class (an index into CLASSES), from its decoded target; None without a
    tokenizer to decode with."""
    if decode is None:
        return None
    return target_class_codes(np.asarray(audit.positions["target_id"]), decode)


def evaluation_line(step: int, comparison: dict) -> str:
    """The one line of an audit at an evaluation (its table and scalars are in its folder and the trackers)."""
    return f"audit at step {step}: {flip_summary_line(comparison)}"


__all__ = [
    "AuditQuietPrinterCallback",
    "AuditQuietProgressCallback",
    "audit_table",
    "class_codes",
    "console_write",
    "evaluation_line",
    "hide_audit_from_console",
    "without_audit",
]
