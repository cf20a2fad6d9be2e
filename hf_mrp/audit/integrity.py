"""Does an audit folder still hold what the audit wrote? audit.json against its positions table and blocks.

An audit writes audit.json last, from the positions table and blocks it has just written, so the
three agree. A table trimmed or edited by hand, or blocks.npy swapped, no longer matches what
audit.json records: say "this file was changed" instead of comparing numbers that mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MRPUserError
from .geometry import AuditResult


def audit_file_problems(audit: AuditResult) -> list[str]:
    """What disagrees between audit.json and the files beside it (empty: the folder is as written)."""
    summary, origin, positions = audit.summary, audit.summary.provenance, audit.positions
    problems = []
    rows = len(positions["margin"]) if "margin" in positions else 0
    if rows != summary.n_positions:
        problems.append(f"positions.parquet has {rows} rows but audit.json says {summary.n_positions} positions")
    elif rows and "correct" in positions and summary.accuracy is not None:
        accuracy = float(np.asarray(positions["correct"]).astype(bool).mean())
        mean_margin = float(np.asarray(positions["margin"], dtype=np.float64).mean())
        if accuracy != summary.accuracy or (
            summary.mean_margin is not None and not np.isclose(mean_margin, summary.mean_margin, rtol=1e-12)
        ):
            problems.append("the values in positions.parquet differ from the accuracy / mean margin audit.json records")
    shape = (origin.get("n_blocks"), origin.get("block_size"))
    if None not in shape and tuple(audit.blocks.input_ids.shape) != shape:
        problems.append(
            f"blocks.npy holds {audit.blocks.input_ids.shape[0]} x {audit.blocks.block_size} blocks but "
            f"audit.json says {shape[0]} x {shape[1]}"
        )
    elif origin.get("blocks_sha256") not in (None, audit.blocks.fingerprint()):
        problems.append("blocks.npy differs from the blocks audit.json records (sha256)")
    return problems


AUDIT_MARKER = "audit.json"  # written last: its presence marks a finished audit
# an audit with layers draws these (manifold.png only with the manifold statistics)
LENS_PICTURES = ("layers.png", "lens_heatmap.png", "lens_curves.png", "manifold.png")
# The order in which geometry.write_audit writes an audit's other files (before AUDIT_MARKER).
WRITE_ORDER = (
    "blocks.npy",
    "mask.npy",
    "positions.parquet",
    "gap_curve.png",
    "margins.png",
    "layers.json",
    *LENS_PICTURES,
)


def written_after_marker(directory: str | Path) -> list[str]:
    """The audit files whose modification time is later than audit.json's, in write order."""
    directory = Path(directory)
    try:
        marker = (directory / "audit.json").stat().st_mtime_ns
    except OSError:
        return []
    return [
        name for name in WRITE_ORDER if (directory / name).is_file() and (directory / name).stat().st_mtime_ns > marker
    ]


def is_interrupted_rewrite(directory: str | Path) -> bool:
    """Newer files that are the first files of the write order: what an audit into a folder that already held one
    leaves when it stops between its files (its audit.json never came). A file edited by hand is newer alone."""
    directory = Path(directory)
    newer = written_after_marker(directory)
    present = [name for name in WRITE_ORDER if (directory / name).is_file()]
    return bool(newer) and newer == present[: len(newer)]


def mixed_audit_error(directory: str | Path, detail: str) -> MRPUserError:
    """One line for a folder that mixes two audits' files (an audit into it stopped between its files)."""
    newer = written_after_marker(directory)
    return MRPUserError(
        f"{directory} holds an unfinished / mixed audit: {', '.join(newer)} {'was' if len(newer) == 1 else 'were'} "
        f"written after its audit.json, as an audit into this folder that stopped between its files leaves them "
        f"({detail}); audit into it again (`hf-mrp audit --overwrite_output_dir true --output_dir {directory}`) or "
        f"into a new folder"
    )


def load_whole_audit(directory: str | Path) -> AuditResult:
    """An audit folder read back and checked (load_audit + check_audit_files); a folder whose files do not even
    load together is named an unfinished / mixed audit when that is what its files' times say."""
    from ..errors import one_line
    from .geometry import load_audit

    try:
        audit = load_audit(directory)
    except MRPUserError as error:
        if is_interrupted_rewrite(directory):
            raise mixed_audit_error(directory, one_line(error)) from None
        raise
    check_audit_files(audit, directory)
    return audit


def check_audit_files(audit: AuditResult, directory: str | Path) -> None:
    """Refuse an audit folder whose files disagree with its audit.json, saying whether an audit into it stopped
    between its files (an unfinished / mixed audit) or a file was edited by hand."""
    problems = audit_file_problems(audit)
    if not problems:
        return
    if is_interrupted_rewrite(directory):
        raise mixed_audit_error(directory, "; ".join(problems))
    raise MRPUserError(
        f"{directory}: edited by hand: this file was changed after the audit wrote it ({'; '.join(problems)}); "
        f"audit again into a new folder (`hf-mrp audit --output_dir ...`) instead of editing its files"
    )
