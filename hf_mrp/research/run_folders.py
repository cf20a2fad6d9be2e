"""Run folders of the harness: when a folder holds a finished refine run, and whether a run or an audit in it
reads back whole (what a sweep keeps, and what it redoes).

A folder "holds a finished run" when refine's last file, ``training_log.json``, is there; writing
into it again needs ``--overwrite_output_dir true`` or a resume (``--resume_from_checkpoint``). An `hf-mrp audit`
folder is owned the same way (hf_mrp.research.audit_run): a finished audit (audit.json) is only replaced with
``--overwrite_output_dir true``, and the new audit's files are swapped in together (folders.swapped_folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..audit.integrity import load_whole_audit
from ..errors import MRPUserError
from ..storage.files import read_json

TRAINING_LOG = "training_log.json"  # the Trainer's log history, which refine writes
FINISHED_MARKER = TRAINING_LOG  # refine writes it last
# What a finished refine run leaves beside its adapter: replaced (not reused) by --overwrite_output_dir.
RUN_OUTPUTS = ("audit_before", "audit_after", "comparison", "audit_step_*", "comparison_step_*")


def holds_finished_run(folder: str | Path) -> bool:
    return (Path(folder) / FINISHED_MARKER).is_file()


def check_may_write(folder: Path, overwrite: bool, resume) -> None:
    """Refuse to write a new run over a finished one unless asked to (overwrite) or resuming it."""
    if holds_finished_run(folder) and not overwrite and not resume:
        raise MRPUserError(
            f"output_dir {folder} holds a finished run ({FINISHED_MARKER}, adapter, audits); nothing was changed. "
            f"Pass another --output_dir, or --overwrite_output_dir true to replace that run"
        )


def forget_finished_run(folder: Path) -> None:
    """Before a new run overwrites a finished one: drop its finished marker first (so the folder never pairs
    old and new files while claiming to be finished) and its audits (so none is reused as this run's baseline)."""
    (folder / FINISHED_MARKER).unlink(missing_ok=True)
    for pattern in RUN_OUTPUTS:
        for path in folder.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def audit_is_whole(folder: str | Path) -> bool:
    """An audit folder whose files read back and agree with its audit.json (a sweep recomputes any other)."""
    try:
        load_whole_audit(folder)
    except MRPUserError:
        return False
    return True


def run_is_whole(run_dir: str | Path) -> bool:
    """A finished refine folder whose files read back: the marker parses, the after-audit loads and agrees
    with its table, the flip audit parses. Anything else counts as unfinished (a sweep redoes it)."""
    run_dir = Path(run_dir)
    if not holds_finished_run(run_dir) or not audit_is_whole(run_dir / "audit_after"):
        return False
    try:
        read_json(run_dir / FINISHED_MARKER)
        read_json(run_dir / "comparison" / "flip_audit.json")
    except MRPUserError:
        return False
    return True
