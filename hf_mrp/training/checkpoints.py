"""Checkpoints to resume from: a missing or half-written one, or one trained with other LoRA or loss settings than
the run that resumes it, is refused with the fix, before training starts (before the model loads, in refine)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import MRPUserError
from ..storage.files import write_json

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


# A resumed run must go on as the run it resumes: a LoRA setting changes the adapter's shapes (loading the
# checkpoint fails deep in torch), a loss setting would make one run of two objectives while its log and model card
# name only the new one. The settings are compared with those each checkpoint records (SETTINGS_FILE).
RESUMED_SETTINGS = (
    "use_lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_layers",
    "trainable_scope",
    "trainable_last_n",
    "mrp_objective",
    "mrp_lambda",
    "mrp_margin_threshold",
    "mrp_margin_normalization",
    "mrp_top_k",
    "label_smoothing_factor",
)
SETTINGS_FILE = "mrp_config.json"  # the run's settings (TrainingArguments.to_dict: token-free), in each checkpoint


class SettingsInCheckpoints(TrainerCallback):
    """Records the run's settings in each checkpoint the Trainer saves, for `check_resumed_settings`. Written after
    trainer_state.json: a checkpoint cut short in between is still complete, and is resumed without the check."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            write_json(folder / SETTINGS_FILE, args.to_dict())


def _resumed_folder(resume_from_checkpoint, output_dir: Path) -> Path | None:
    if isinstance(resume_from_checkpoint, (str, Path)):
        return Path(resume_from_checkpoint)
    complete = complete_checkpoints(output_dir) if resume_from_checkpoint is True else []
    return complete[-1] if complete else None


def _as_flag(name: str, value) -> str:
    """A setting as the command line gives it: ``--lora_r 16``, ``--use_lora true``, ``no --lora_layers``."""
    if value is None:
        return f"no --{name}"
    if isinstance(value, list):
        return f"--{name} {' '.join(map(str, value))}"
    shown = str(value).lower() if isinstance(value, bool) else value
    return f"--{name} {shown}"


def check_resumed_settings(args, resume_from_checkpoint) -> None:
    """Refuse, before anything loads, to resume a checkpoint under other RESUMED_SETTINGS than it was trained with,
    naming each flag and its saved value (a checkpoint without SETTINGS_FILE has nothing to compare)."""
    folder = _resumed_folder(resume_from_checkpoint, Path(args.output_dir))
    try:
        saved = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8")) if folder is not None else {}
    except (OSError, ValueError):
        return
    if not isinstance(saved, dict):
        return
    names = [name for name in RESUMED_SETTINGS if hasattr(args, name) and name in saved]  # MRPSFTConfig: no lora_*
    current = json.loads(json.dumps({name: getattr(args, name) for name in names}))  # as saved: lists, not tuples
    changed = [name for name in names if saved[name] != current[name]]
    if changed:
        was = " ".join(_as_flag(name, saved[name]) for name in changed)
        now = " ".join(_as_flag(name, current[name]) for name in changed)
        raise MRPUserError(
            f"checkpoint {folder} was trained with {was}, but this run passes {now}: a resumed run must go on with "
            f"the settings it was trained with (LoRA settings shape the adapter, loss settings the objective); "
            f"resume with {was}, or start a new run (drop --resume_from_checkpoint, pass another --output_dir)"
        )
