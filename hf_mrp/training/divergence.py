"""Divergence is a failure: a run whose trainable weights are no longer finite, or whose loss stays non-finite
batch after batch, stops with one line that names the step and the likely cause, instead of saving NaN weights
as a finished run.

The checks are cheap (one ``isfinite`` per trainable tensor, one flag agreed over all processes) and run at the
start of every training step (`MRPTrainerMixin.training_step`) and once after training (`hf_mrp.research.refine`). A
checkpoint saved after the weights went non-finite cannot be resumed from; it is removed, so the output folder
keeps only checkpoints of finite weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import MRPUserError

MAX_NONFINITE_STEPS = 3  # optimizer steps in a row whose every batch had a non-finite loss: the run has diverged


class TrainingDiverged(MRPUserError):
    """The run diverged: its weights or its loss are no longer finite. Nothing is marked finished."""


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """This process's values of a parameter: its shard under FSDP2 (DTensor) or ZeRO-3 (ds_tensor)."""
    local = parameter.to_local() if hasattr(parameter, "to_local") else getattr(parameter, "ds_tensor", parameter)
    return local.detach()


def weights_are_finite(trainer) -> bool:
    """Whether every trainable parameter is finite on every process (one all-reduced flag: all stop together)."""
    params = [_local(p) for p in trainer.model.parameters() if p.requires_grad]
    params = [p for p in params if p.numel()]
    local = torch.stack([torch.isfinite(p).all() for p in params]).all() if params else torch.tensor(True)
    bad = (~local).to(torch.float32).reshape(1).to(trainer.args.device)
    if trainer.accelerator.num_processes > 1:
        bad = trainer.accelerator.reduce(bad, reduction="sum")
    return float(bad.item()) == 0.0


def _checkpoint_step(folder: Path) -> int:
    suffix = folder.name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


def drop_checkpoints_after(output_dir: str | Path, last_finite_step: int, step: int) -> tuple[list[str], str | None]:
    """Remove the checkpoints this run saved after ``last_finite_step``, up to ``step`` (their weights are not
    finite); returns (the removed names, the newest checkpoint kept or None)."""
    folders = sorted(Path(output_dir).glob("checkpoint-*"), key=_checkpoint_step)
    removed = [f.name for f in folders if last_finite_step < _checkpoint_step(f) <= step]
    for name in removed:
        shutil.rmtree(Path(output_dir) / name, ignore_errors=True)
    kept = [f for f in folders if f.name not in removed and f.is_dir()]
    return removed, str(kept[-1]) if kept else None


def diverged(trainer, step: int, problem: str, last_finite_step: int) -> TrainingDiverged:
    """The one-line failure: the step, what went non-finite, the likely cause, and what is (not) on disk."""
    args = trainer.args
    removed: list[str] = []
    kept: str | None = None
    if trainer.is_world_process_zero():
        removed, kept = drop_checkpoints_after(args.output_dir, last_finite_step, trainer.state.global_step)
    kept_text = f"the last finite checkpoint is {kept}" if kept else "no checkpoint of finite weights was saved"
    if removed:
        kept_text += f" ({', '.join(removed)}, saved after the weights went non-finite, was removed)"
    return TrainingDiverged(
        f"training diverged at step {step}: {problem}; the likely cause is a learning rate "
        f"or mrp_lambda too large (learning_rate {args.learning_rate:g}, mrp_lambda {args.mrp_lambda:g}): lower "
        f"--learning_rate (or --mrp_lambda) and train again; nothing was saved as a finished run, {kept_text}"
    )


def check_weights(trainer) -> None:
    """Raise TrainingDiverged when the trainable weights are not finite (after the last optimizer step)."""
    step = trainer.state.global_step
    if getattr(trainer, "_finite_weights_step", None) == step:
        return  # checked already at this step (a later micro-batch of the same accumulation)
    if not weights_are_finite(trainer):
        last = getattr(trainer, "_finite_weights_step", None)
        last = step - 1 if last is None else last
        problem = (
            "its update made the trainable weights non-finite (NaN/inf)"
            if step
            else "the trainable weights are not finite (NaN/inf) before the first update"
        )
        raise diverged(trainer, step, problem, last)
    trainer._finite_weights_step = step


def count_nonfinite_batch(trainer, skipped: bool) -> None:
    """Count consecutive skipped (non-finite) batches; more than MAX_NONFINITE_STEPS steps' worth is divergence."""
    trainer._consecutive_nonfinite = getattr(trainer, "_consecutive_nonfinite", 0) + 1 if skipped else 0
    limit = MAX_NONFINITE_STEPS * max(int(trainer.args.gradient_accumulation_steps), 1)
    if trainer._consecutive_nonfinite >= limit:
        step = trainer.state.global_step
        raise diverged(
            trainer,
            step + 1,
            f"the loss or the MRP objective was not finite (NaN/inf) for {limit} batches "
            f"in a row ({MAX_NONFINITE_STEPS} steps)",
            step,
        )


__all__ = [
    "MAX_NONFINITE_STEPS",
    "TrainingDiverged",
    "check_weights",
    "count_nonfinite_batch",
    "weights_are_finite",
    "drop_checkpoints_after",
]
