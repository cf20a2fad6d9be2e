"""Divergence and collapse are failures: a run whose trainable weights are no longer finite, whose loss stays
non-finite batch after batch, whose weights get no gradient at all step after step (every logit tied: the model
collapsed), or whose updates changed no weight, stops with one line that names the step and the likely cause,
instead of saving a dead model as a finished run.

Nothing here asks the device for a number on the hot path: the counts of skipped (non-finite) micro-batches and of
zero-gradient steps are kept as device tensors (`count_nonfinite_batch`, `record_gradient_norm`), and `check_weights`
reads them together with one ``isfinite`` per trainable tensor, in one host transfer agreed over all processes, only
at the first training step, at each logging, saving and evaluation step (so no checkpoint of bad weights is ever
saved) and after training. The refine pipeline and `MRPAuditCallback` also refuse an after-audit whose every position
ties its top two logits, or whose top-1 accuracy fell more than ``max_accuracy_drop`` points below the before-audit's.
A checkpoint saved after the weights went bad cannot be resumed from; it is removed, so the output folder keeps only
checkpoints of good weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import MRPUserError
from ..ops.fused import penalty_fault_message

MAX_NONFINITE_STEPS = 3  # optimizer steps in a row whose every batch had a non-finite loss: the run has diverged
# optimizer steps in a row whose gradient norm is exactly 0: the model has collapsed. CE's gradient on the logits is
# softmax - onehot, never 0, so an exactly zero gradient of every trainable weight means nothing upstream of the
# logits moves them any more (a saturated or zeroed network), not a quiet batch.
MAX_ZERO_GRADIENT_STEPS = 3
TOO_LARGE = "a learning rate or mrp_lambda too large"
# top-1 accuracy points the audited positions may lose before a run counts as collapsed: the objectives with CE
# cost at most ~1.5 points at their released lambdas (docs/results.md), Fisher alone (mrp_ce_weight 0) lost 21
DEFAULT_MAX_ACCURACY_DROP = 10.0


class TrainingDiverged(MRPUserError):
    """The run diverged: its weights or its loss are no longer finite. Nothing is marked finished."""


class TrainingCollapsed(TrainingDiverged):
    """The run collapsed (no gradient, every logit tied) or trained nothing. Nothing is marked finished; handled
    everywhere exactly as a diverged run (it is one)."""


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """This process's values of a parameter: its shard under FSDP2 (DTensor) or ZeRO-3 (ds_tensor)."""
    local = parameter.to_local() if hasattr(parameter, "to_local") else getattr(parameter, "ds_tensor", parameter)
    return local.detach()


def _trainable(trainer) -> list[torch.Tensor]:
    params = [_local(p) for p in trainer.model.parameters() if p.requires_grad]
    return [p for p in params if p.numel()]


def _agreed(trainer, flags: torch.Tensor) -> list[float]:
    """Per-process flags averaged over all processes (> 0: true on some process), read in one host transfer."""
    flags = flags.to(torch.float32).to(trainer.args.device)
    if trainer.accelerator.num_processes > 1:
        flags = trainer.accelerator.reduce(flags, reduction="mean")
    return flags.tolist()


def _nonfinite(trainer) -> torch.Tensor:
    params = _trainable(trainer)
    local = torch.stack([torch.isfinite(p).all() for p in params]).all() if params else torch.tensor(True)
    return (~local).to(torch.float32).reshape(1).to(trainer.args.device)


def weights_are_finite(trainer) -> bool:
    """Whether every trainable parameter is finite on every process (one all-reduced flag: all stop together)."""
    return _agreed(trainer, _nonfinite(trainer))[0] == 0.0


def record_gradient_norm(trainer, norm) -> None:
    """Count the optimizer steps in a row whose gradient norm is exactly 0, on the device (no host read here).

    Args:
        trainer: the MRP trainer; the count lives in ``trainer._zero_gradient_steps``.
        norm: the step's gradient norm as the Trainer computed it (a tensor; a float under DeepSpeed). It is the
            global norm (all processes' gradients), so every process counts the same.
    """
    norm = torch.as_tensor(norm, device=trainer.args.device)
    streak = getattr(trainer, "_zero_gradient_steps", None)
    streak = torch.zeros((), device=norm.device) if streak is None else streak
    trainer._zero_gradient_steps = torch.where(norm == 0, streak + 1, torch.zeros_like(streak))


def _checkpoint_step(folder: Path) -> int:
    suffix = folder.name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


def drop_checkpoints_after(output_dir: str | Path, last_good_step: int, step: int) -> tuple[list[str], str | None]:
    """Remove the checkpoints this run saved after ``last_good_step``, up to ``step`` (their weights are bad);
    returns (the removed names, the newest checkpoint kept or None)."""
    folders = sorted(Path(output_dir).glob("checkpoint-*"), key=_checkpoint_step)
    removed = [f.name for f in folders if last_good_step < _checkpoint_step(f) <= step]
    for name in removed:
        shutil.rmtree(Path(output_dir) / name, ignore_errors=True)
    kept = [f for f in folders if f.name not in removed and f.is_dir()]
    return removed, str(kept[-1]) if kept else None


def diverged(
    trainer,
    step: int,
    problem: str,
    last_good_step: int,
    kind: type[TrainingDiverged] = TrainingDiverged,
    cause: str = TOO_LARGE,
) -> TrainingDiverged:
    """The one-line failure: the step, what went wrong, the likely cause, and what is (not) on disk."""
    args = trainer.args
    removed: list[str] = []
    kept: str | None = None
    if trainer.is_world_process_zero():
        removed, kept = drop_checkpoints_after(args.output_dir, last_good_step, trainer.state.global_step)
    kept_text = f"the last good checkpoint is {kept}" if kept else "no checkpoint of good weights was saved"
    if removed:
        kept_text += f" ({', '.join(removed)}, saved after the weights went bad, was removed)"
    fix = "lower --learning_rate (or --mrp_lambda)" if cause == TOO_LARGE else "raise --learning_rate"
    verb = "collapsed" if kind is TrainingCollapsed else "diverged"
    settings = f"learning_rate {args.learning_rate:g}, mrp_lambda {getattr(args, 'mrp_lambda', 0.0):g}"
    return kind(
        f"training {verb} at step {step}: {problem}; the likely cause is {cause} ({settings}): {fix} and train "
        f"again; nothing was saved as a finished run, {kept_text}"
    )


def check_weights(trainer) -> None:
    """Raise TrainingDiverged when the trainable weights are not finite or the loss was not finite for
    MAX_NONFINITE_STEPS steps in a row, and TrainingCollapsed after MAX_ZERO_GRADIENT_STEPS steps in a row without
    any gradient. One host read of every count (see the module docstring for when it runs)."""
    step = trainer.state.global_step
    if getattr(trainer, "_finite_weights_step", None) == step:
        return  # checked already at this step
    device = trainer.args.device
    streak = getattr(trainer, "_zero_gradient_steps", None)
    counts = getattr(trainer, "_nonfinite_counts", None)
    faults = getattr(trainer, "_penalty_faults", None)
    flags = torch.cat(
        [
            _nonfinite(trainer),
            torch.zeros(1, device=device) if streak is None else streak.reshape(1).to(device),
            torch.zeros(3, device=device) if counts is None else counts.to(device),
            torch.zeros(1, device=device) if faults is None else faults.to(device, torch.float32),
        ]
    )
    nonfinite, zero_steps, skipped, _, longest, penalty_faults = _agreed(trainer, flags)
    if penalty_faults:  # the objective itself, not the data or the weights: its own one line
        raise MRPUserError(penalty_fault_message(trainer.args.mrp_settings.record.name))
    trainer._skipped_batches = int(skipped)  # for the log: the skipped micro-batches of this process's training
    last = getattr(trainer, "_finite_weights_step", None)
    last = step - 1 if last is None else last
    if nonfinite:
        raise diverged(trainer, step, _nonfinite_problem(step, last), last)
    failure = _nonfinite_run_failure(trainer, longest, last)
    if failure is not None:
        raise failure
    if zero_steps >= MAX_ZERO_GRADIENT_STEPS:
        first = step - int(zero_steps) + 1  # the first step whose gradient was 0: its weights, W_(first-1), are dead
        raise diverged(
            trainer,
            first - 1,
            f"after its update the trainable weights got no gradient at all (gradient norm exactly 0) in steps "
            f"{first}-{step}: the model collapsed (its logits no longer move; typically every logit tied)",
            first - 2,
            TrainingCollapsed,
        )
    if counts is not None:  # the longest run is counted anew from the current one until the next check
        trainer._nonfinite_counts = torch.stack([counts[0], counts[1], counts[1]])
    trainer._finite_weights_step = step


def _nonfinite_problem(step: int, last: int) -> str:
    if not step:
        return "the trainable weights are not finite (NaN/inf) before the first update"
    if last >= step - 1:
        return "its update made the trainable weights non-finite (NaN/inf)"
    return f"the trainable weights are non-finite (NaN/inf) after its update (finite at step {last}, the last check)"


def fingerprint(trainer) -> torch.Tensor:
    """Per trainable tensor (this process's shard), the float64 sum and sum of squares: equal to the last bit before
    and after training only if no update changed a weight."""
    params = _trainable(trainer)
    if not params:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in params]).cpu()


def check_weights_changed(trainer, before: torch.Tensor, steps: int) -> None:
    """Raise TrainingCollapsed when ``steps`` optimizer steps changed no trainable weight on any process (updates
    below the weights' float resolution, a learning rate of 0 throughout): a run that trained nothing."""
    after = fingerprint(trainer)
    same = torch.tensor([float(before.shape == after.shape and torch.equal(before, after))])
    if steps <= 0 or _agreed(trainer, same)[0] < 1.0:
        return  # some process saw a change
    step = trainer.state.global_step
    raise diverged(
        trainer,
        step,
        f"its {steps} updates changed no trainable weight (bit for bit): the run trained nothing",
        step,
        TrainingCollapsed,
        cause="a learning rate too small for the weights' float resolution (or 0 throughout the schedule)",
    )


def check_decisions_alive(mean_margin_before: float, mean_margin_after: float, trainer) -> None:
    """Raise TrainingCollapsed when the after-audit ties the top two logits at every audited position (mean margin
    exactly 0; margins are >= 0) while the before-audit did not: the refined model decides nothing."""
    if mean_margin_after != 0.0 or mean_margin_before == 0.0:
        return
    step = trainer.state.global_step
    streak = getattr(trainer, "_zero_gradient_steps", None)
    zero_steps = int(streak.item()) if streak is not None else 0  # once, after training: no hot-path read
    last_good = step - zero_steps - 1 if zero_steps else step
    raise diverged(
        trainer,
        step,
        "after training the model ties its top two logits at every audited position (mean margin exactly 0): "
        "it collapsed",
        last_good,
        TrainingCollapsed,
    )


def check_max_accuracy_drop(max_drop: float | None) -> None:
    """``max_accuracy_drop`` is None (no limit) or a number of points in [0, 100]."""
    number = isinstance(max_drop, (int, float)) and not isinstance(max_drop, bool)
    if max_drop is not None and not (number and 0 <= max_drop <= 100):
        raise MRPUserError(
            f"max_accuracy_drop is the top-1 accuracy (in points of 100) the audited positions may lose before the "
            f"run counts as collapsed: a number in [0, 100] (100: never), got {max_drop!r}"
        )


def check_accuracy_kept(comparison: dict, max_drop: float | None, trainer) -> None:
    """Raise TrainingCollapsed when the after-audit's top-1 accuracy is more than ``max_drop`` points (of 100) below the
    before-audit's on the same positions: the objective outweighed the cross-entropy (no finished run to use)."""
    before, after = comparison["accuracy_before"], comparison["accuracy_after"]
    drop = 100.0 * (before - after)
    if max_drop is None or not drop > max_drop:
        return
    args = trainer.args
    settings = f"mrp_ce_weight {getattr(args, 'mrp_ce_weight', 1.0):g}, mrp_lambda {getattr(args, 'mrp_lambda', 0.0):g}"
    raise TrainingCollapsed(
        f"training collapsed by step {trainer.state.global_step}: top-1 accuracy on the {comparison['n_positions']:,} "
        f"audited positions fell from {100 * before:.1f}% to {100 * after:.1f}% ({drop:.1f} points, more than "
        f"max_accuracy_drop {max_drop:g}); the likely cause is the objective outweighing the cross-entropy "
        f"({settings}): lower mrp_lambda or keep mrp_ce_weight at 1 and train again (or raise --max_accuracy_drop, "
        "100 never refuses, to keep such a run for study); nothing was saved as a finished run"
    )


def count_nonfinite_batch(trainer, skipped: torch.Tensor) -> None:
    """Count a micro-batch that was skipped (``skipped``: a device bool agreed over processes) without reading it:
    ``trainer._nonfinite_counts`` holds [skipped in all, skipped in a row, the longest such run since the last
    check] as a device tensor, read by `check_weights`."""
    counts = getattr(trainer, "_nonfinite_counts", None)
    counts = torch.zeros(3, device=skipped.device) if counts is None else counts
    skipped = skipped.to(counts.dtype)
    run = (counts[1] + 1) * skipped  # 0 again after a finite batch
    trainer._nonfinite_counts = torch.stack([counts[0] + skipped, run, torch.maximum(counts[2], run)])


def _nonfinite_run_failure(trainer, longest: float, last: int) -> TrainingDiverged | None:
    limit = MAX_NONFINITE_STEPS * max(int(trainer.args.gradient_accumulation_steps), 1)
    if longest < limit:
        return None
    step = trainer.state.global_step
    return diverged(
        trainer,
        step,
        f"the loss or the MRP objective was not finite (NaN/inf) for {int(longest)} batches in a row "
        f"({MAX_NONFINITE_STEPS} steps or more)",
        last,
    )


__all__ = [
    "DEFAULT_MAX_ACCURACY_DROP",
    "MAX_NONFINITE_STEPS",
    "MAX_ZERO_GRADIENT_STEPS",
    "TrainingCollapsed",
    "TrainingDiverged",
    "check_accuracy_kept",
    "check_decisions_alive",
    "check_max_accuracy_drop",
    "check_weights",
    "check_weights_changed",
    "count_nonfinite_batch",
    "fingerprint",
    "record_gradient_norm",
    "weights_are_finite",
    "drop_checkpoints_after",
]
