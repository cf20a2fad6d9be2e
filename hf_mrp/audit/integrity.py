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


def _legacy_fingerprint(blocks) -> str:
    """The fingerprint audits wrote before it covered the block shape and tokenizer (ids + count)."""
    import hashlib

    digest = hashlib.sha256(np.ascontiguousarray(blocks.input_ids, dtype=np.int64).tobytes())
    digest.update(str(blocks.n_positions).encode())
    return digest.hexdigest()


def audit_file_problems(audit: AuditResult) -> list[str]:
    """What disagrees between audit.json and the files beside it (empty: the folder is as written)."""
    summary, origin, positions = audit.summary, audit.summary.get("provenance", {}), audit.positions
    problems = []
    rows = len(positions["margin"]) if "margin" in positions else 0
    if rows != summary.get("n_positions"):
        problems.append(f"positions.parquet has {rows} rows but audit.json says {summary.get('n_positions')} positions")
    elif rows and "correct" in positions and summary.get("accuracy") is not None:
        accuracy = float(np.asarray(positions["correct"]).astype(bool).mean())
        mean_margin = float(np.asarray(positions["margin"], dtype=np.float64).mean())
        if accuracy != summary["accuracy"] or (summary.get("mean_margin") is not None
                                               and not np.isclose(mean_margin, summary["mean_margin"], rtol=1e-12)):
            problems.append("the values in positions.parquet differ from the accuracy / mean margin audit.json records")
    shape = (origin.get("n_blocks"), origin.get("block_size"))
    if None not in shape and tuple(audit.blocks.input_ids.shape) != shape:
        problems.append(f"blocks.npy holds {audit.blocks.input_ids.shape[0]} x {audit.blocks.block_size} blocks but "
                        f"audit.json says {shape[0]} x {shape[1]}")
    elif origin.get("blocks_sha256") not in (None, audit.blocks.fingerprint(), _legacy_fingerprint(audit.blocks)):
        problems.append("blocks.npy differs from the blocks audit.json records (sha256)")
    return problems


def check_audit_files(audit: AuditResult, directory: str | Path) -> None:
    """Refuse an audit folder whose files were changed after the audit wrote them."""
    problems = audit_file_problems(audit)
    if problems:
        raise MRPUserError(
            f"{directory}: this file was changed after the audit wrote it ({'; '.join(problems)}); "
            f"audit again into a new folder (`hf-mrp audit --output_dir ...`) instead of editing its files"
        )
