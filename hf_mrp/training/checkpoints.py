"""Checkpoints to resume from: a missing or half-written one is refused with the fix, before training starts."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MRPUserError

CHECKPOINT_COMPLETE_FILE = "trainer_state.json"  # the Trainer writes it last into a checkpoint


def check_resume_target(resume_from_checkpoint: str | Path | bool | None, output_dir: str | Path) -> None:
    """What ``Trainer.train(resume_from_checkpoint=...)`` is about to load exists and is whole."""
    output_dir = Path(output_dir)
    if isinstance(resume_from_checkpoint, (str, Path)):
        _check_checkpoint(Path(resume_from_checkpoint), output_dir)
    elif resume_from_checkpoint is True and not complete_checkpoints(output_dir):
        raise MRPUserError(
            f"resume_from_checkpoint=True, but {output_dir} holds no complete checkpoint-N folder; "
            "train from scratch (drop the flag) or pass the output_dir of the interrupted run"
        )


def _is_complete_checkpoint(folder: Path) -> bool:
    """trainer_state.json is the last file the Trainer writes into a checkpoint: whole JSON = complete."""
    try:
        json.loads((folder / CHECKPOINT_COMPLETE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def complete_checkpoints(output_dir: Path) -> list[Path]:
    def step(folder: Path) -> int:
        suffix = folder.name.rsplit("-", 1)[-1]
        return int(suffix) if suffix.isdigit() else -1

    return sorted((p for p in output_dir.glob("checkpoint-*") if _is_complete_checkpoint(p)), key=step)


def _check_checkpoint(folder: Path, output_dir: Path) -> None:
    """A checkpoint to resume from must be a folder whose trainer_state.json (written last) is whole."""
    available = complete_checkpoints(output_dir)
    hint = (
        f"complete checkpoints in {output_dir}: {', '.join(p.name for p in available)}"
        if available
        else f"{output_dir} holds no complete checkpoint; train from scratch (drop --resume_from_checkpoint)"
    )
    if not folder.is_dir():
        raise MRPUserError(
            f"resume_from_checkpoint {str(folder)!r} is not a folder; pass a checkpoint-N folder ({hint})"
        )
    if not _is_complete_checkpoint(folder):
        raise MRPUserError(
            f"checkpoint {folder} is incomplete ({CHECKPOINT_COMPLETE_FILE} is missing or cut short: the run stopped "
            f"while saving it); resume from an earlier checkpoint ({hint})"
        ) from None
