"""What both MRP trainers (`MRPTrainer`, `MRPSFTTrainer`) do around the shared loss path (`loss.py`).

Mixed in ahead of their `Trainer` base (``class MRPTrainer(MRPTrainerMixin, Trainer)``), so every
``super()`` call reaches that base: the loss normalized like the models' own CE, the exact
position-weighted logging of ``loss_ce`` / ``loss_mrp`` / ``mean_margin`` across processes, the
non-finite guard of a training step, the refusal of a missing or half-written checkpoint to resume from, and
every callback that logs through its trainer (one with an ``attach(trainer)`` method, like `MRPAuditCallback`)
attached ahead of the reporters.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ..errors import MRPUserError
from ..models import probe_logit_transform, vocab_size
from .checkpoints import SettingsInCheckpoints, check_resume_target, check_resumed_settings
from .dataset_checks import check_token_range
from .depth import check_depth
from .divergence import check_weights, check_weights_changed, count_nonfinite_batch, fingerprint, record_gradient_norm
from .ewc import EWCPenalty, check_ewc_applies, estimate_penalty
from .loss import unwrap

logger = logging.getLogger(__name__)

METRICS = ("loss_ce", "loss_mrp", "mean_margin")
SKIPPED_KEY = "nonfinite_skipped"

if TYPE_CHECKING:  # the type checker sees the Trainer the mixin is mixed ahead of; at run time a plain base
    from transformers import Trainer as _TrainerBase

    from .config import MRPConfig
else:
    _TrainerBase = object


class MRPTrainerMixin(_TrainerBase):
    """Loss normalization, recording, the non-finite guard and logging shared by the MRP trainers."""

    if TYPE_CHECKING:  # what Trainer.__init__ has set before any method here runs
        model: torch.nn.Module
        args: MRPConfig  # or MRPSFTConfig: the same MRP fields

    @staticmethod
    def _refuse_compute_loss_func(kwargs: dict, trainer: str, plain: str) -> None:
        """Before any work: both MRP trainers compute their own loss, so a ``compute_loss_func`` would be ignored."""
        if kwargs.get("compute_loss_func") is not None:
            raise MRPUserError(
                f"{trainer} computes its own loss (CE + mrp_lambda * objective, in the output head); drop "
                f"compute_loss_func, or use {plain} for a loss of your own"
            )

    def _init_mrp_state(self) -> None:
        """Call after ``Trainer.__init__``; refuses a top-k beyond the vocabulary. The loss is a sum over valid
        shifted positions / num_items_in_batch, like the models' own CE: the Trainer counts those items (over
        labels[..., 1:]) and skips its own GA rescaling."""
        vocab, settings = vocab_size(self.model), self.args.mrp_settings
        if self.args.mrp_top_k > vocab:
            raise MRPUserError(f"mrp_top_k ({self.args.mrp_top_k}) exceeds the vocabulary ({vocab}); lower it")
        if settings.k > vocab:
            raise MRPUserError(
                f"objective {settings.objective!r} reads the top {settings.k} logits, more than the vocabulary "
                f"({vocab})"
            )
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        # [ce, objective, margin, positions, depth] summed over processes since the last log (a device tensor)
        self._mrp_sums: dict[str, torch.Tensor | None] = {"train": None, "eval": None}
        self._guard_nonfinite = False  # on while training_step runs compute_loss
        self._skip_batch: torch.Tensor | None = None  # set by compute_loss: this micro-batch is skipped (device bool)
        self._skipped_batches = 0  # skipped micro-batches of this process's training, as read at the last check
        self._skipped_logged = 0  # ... as the last log saw them (a warning names the new ones)
        self._skipped_before: int | None = None  # the count logged before a resume (read from the restored log history)
        self._loss_only_prediction = False  # set by prediction_step: the evaluation needs no logits
        self._start_weights: tuple[torch.Tensor, int] | None = None  # fingerprint, step: at the first training step
        self._ewc: EWCPenalty | None = None  # the EWC term (ewc.py), estimated at the first training step
        self._ewc_logged: tuple[torch.Tensor | float, int] = (0.0, 0)  # EWC terms since the last log, and their count
        self._penalty_faults: torch.Tensor | None = None  # micro-batches whose objective alone was not finite
        self._first_batch_checked = False  # the first training batch is checked on the host (ids, objective)
        self._recording = True  # off: compute_loss records no sums or metrics (EWC's Fisher batches, ewc.py)
        for name in ("train_dataset", "eval_dataset"):  # map-style data: every token id, on the host, once
            data = getattr(self, name, None)
            for part in data.values() if isinstance(data, dict) else [data]:
                check_token_range(part, vocab, name)
        probe_logit_transform(unwrap(self.model))
        check_depth(unwrap(self.model), settings)  # target layers and a tuned lens, before training
        self.add_callback(SettingsInCheckpoints())  # what a resume is checked against
        for callback in list(self.callback_handler.callbacks):
            if callable(getattr(callback, "attach", None)):  # it logs through its trainer: attached ahead of reporters
                self.callback_handler.callbacks.remove(callback)
                callback.attach(self)

    def _host_checks(self) -> bool:
        """Whether this forward checks what needs a host read (token ids, the objective's finiteness): evaluation
        and the first training batch do; later training steps leave the data to the up-front check and the
        objective to `check_weights`."""
        return not self.model.training or not self._first_batch_checked

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """The Trainer's evaluation step; the model's real logits are formed only when predictions are kept."""
        self._loss_only_prediction = prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._loss_only_prediction = False

    def _logits_wanted(self, inputs: dict, return_outputs: bool) -> bool:
        """Whether compute_loss must hand back real logits: asked for outputs, and not a loss-only evaluation
        (``prediction_loss_only``, or the Trainer's ``skip_logits`` flag, which is dropped from ``inputs``)."""
        skip = bool(inputs.pop("skip_logits", False))
        return return_outputs and not (skip or self._loss_only_prediction)

    def _normalized_loss(self, sums, num_items_in_batch) -> torch.Tensor:
        """sums.total / the items of the step (all processes when averaging tokens across devices)."""
        if num_items_in_batch is None:
            return self._with_ewc(sums.total / sums.n_positions.clamp(min=1), accumulated=False)
        # a batch without a single valid label sums to 0: keep 0 / 0 from becoming NaN
        items = num_items_in_batch
        items = items.clamp(min=1) if torch.is_tensor(items) else max(items, 1)
        loss = sums.total / items
        if self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return self._with_ewc(loss, accumulated=True)

    def _with_ewc(self, loss: torch.Tensor, accumulated: bool) -> torch.Tensor:
        """+ the EWC term while training (ewc.py): once per optimizer step, so a 1 / accumulation-steps share per
        micro-batch when the Trainer does not divide the loss itself (``accumulated``: num_items_in_batch given);
        every process adds the same term, which DDP's gradient averaging keeps."""
        ewc = self._ewc
        if ewc is None or not self.model.training:
            return loss
        term = ewc()
        self._ewc_logged = (self._ewc_logged[0] + term.detach(), self._ewc_logged[1] + 1)
        share = self.current_gradient_accumulation_steps if accumulated else 1
        return loss + term.to(loss.device) / share

    def _recorded_loss(self, sums, loss: torch.Tensor, outputs) -> torch.Tensor:
        """Record the sums; inside a training step, a loss that is not finite on some process becomes an exact zero
        over the same forward graph (every process still runs its backward: DDP and accumulation stay in step).
        The choice is made on the device (no host read): the zero's branch gets the backward when not finite."""
        guarded = self._guard_nonfinite and self.model.training
        finite = self._record(sums, loss, keep_nonfinite=not guarded)
        if not guarded:
            return loss
        self._skip_batch = ~finite
        return torch.where(finite, loss, outputs.logits.sum() * 0.0)

    def _record(self, sums, loss: torch.Tensor, keep_nonfinite: bool = True) -> torch.Tensor:
        """Accumulate sums over processes on the device, so logged means are exact position-weighted means.

        Returns whether the loss and the objective are finite on every process, as a device bool (one all-reduce
        carries both the sums and that flag, so all processes take the same decision; nothing is read by the
        host). Non-finite sums are not accumulated unless ``keep_nonfinite``; nothing while ``_recording`` is off.
        """
        parts = torch.stack([sums.ce.detach(), sums.objective.detach(), loss.detach().float()])
        local = torch.stack(
            [
                sums.ce.detach().double(),
                sums.objective.detach().double(),
                sums.margin.detach().double(),
                sums.n_positions.double().reshape(()),
                (sums.depth.detach() if sums.depth is not None else sums.ce.new_zeros(())).double(),
                (~torch.isfinite(parts)).any().double(),
            ]
        )
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        finite = total[5] == 0
        if not self._recording:
            return finite
        kept = total[:5] if keep_nonfinite else torch.where(finite, total[:5], torch.zeros_like(total[:5]))
        if sums.penalty_fault is not None:
            fault = sums.penalty_fault.detach().reshape(1)
            self._penalty_faults = fault if self._penalty_faults is None else self._penalty_faults + fault
        mode = "train" if self.model.training else "eval"
        previous = self._mrp_sums[mode]
        self._mrp_sums[mode] = kept if previous is None else previous + kept
        return finite

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, refusing a missing or incomplete checkpoint, or one trained with other LoRA or loss
        settings, with a message that names the fix, and failing (divergence.TrainingDiverged) when the final weights
        are not finite, or (TrainingCollapsed) when the run's updates changed no trainable weight."""
        check_resume_target(resume_from_checkpoint, self.args.output_dir)
        check_resumed_settings(self.args, resume_from_checkpoint)
        check_ewc_applies(self, resume_from_checkpoint)
        self._ewc, self._ewc_logged = None, (0.0, 0)
        self._zero_gradient_steps = None  # zero-gradient optimizer steps in a row (divergence.record_gradient_norm)
        self._start_weights = None
        output = super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )
        check_weights(self)  # the last update too: a run that ends with non-finite weights is no success
        if self._start_weights is not None:  # a run that trained nothing is no success either
            before, start_step = self._start_weights
            check_weights_changed(self, before, self.state.global_step - start_step)
        return output

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm of each optimizer step, also counted (on the device) when exactly 0: steps
        in a row without any gradient are a collapsed run (divergence.check_weights)."""
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        record_gradient_norm(self, norm)
        return norm

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """The Trainer's step, with non-finite micro-batches skipped.

        When the loss or the objective of a micro-batch is NaN/inf on any process, every process
        backpropagates an exact zero instead (no gradient from that micro-batch; the accumulation and
        DDP all-reduce go on as usual, and the step's ``num_items_in_batch`` still counts its items),
        sets non-finite gradient entries to 0, warns, and returns a zero loss, so the logged ``loss``
        stays finite. ``nonfinite_skipped`` in the logs counts the skipped micro-batches.

        Divergence stops the run (divergence.TrainingDiverged, one line): trainable weights that an update made
        non-finite, MAX_NONFINITE_STEPS steps in a row of nothing but non-finite batches, or (TrainingCollapsed)
        MAX_ZERO_GRADIENT_STEPS steps in a row whose gradient is exactly 0.
        """
        if self._start_weights is None:  # the first step of this train() call: the weights it starts from
            check_weights(self)
            self._start_weights = (fingerprint(self), self.state.global_step)
            if self.args.mrp_ewc_lambda > 0:
                self._ewc = estimate_penalty(self, model)
        self._guard_nonfinite, self._skip_batch = True, None
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._guard_nonfinite = False
        self._first_batch_checked = True
        if self._skip_batch is not None:
            count_nonfinite_batch(self, self._skip_batch)
            self._skip_batch = None
        return loss

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        """The Trainer's logging / saving / evaluation point after an optimizer step: the divergence checks run
        here (before anything is saved), not at every step, so the hot path asks the device for nothing."""
        control = self.control
        if control.should_log or control.should_save or control.should_evaluate:
            check_weights(self)
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def recorded_sums(self, mode: str = "train") -> dict[str, float]:
        """The CE, objective and margin sums and the position count recorded since the last log (over all
        processes), read from the device: what the next log divides into loss_ce / loss_mrp / mean_margin."""
        sums = self._mrp_sums[mode]
        values = sums.tolist() if sums is not None else [0.0] * 5  # the one host read of the sums
        return dict(zip(("ce", "objective", "margin", "n", "depth"), values))

    def _skipped_total(self) -> int:
        """Skipped micro-batches of the whole run: this process's count plus the count logged before a resume."""
        if self._skipped_before is None:
            logged = [row[SKIPPED_KEY] for row in self.state.log_history if SKIPPED_KEY in row]
            self._skipped_before = int(logged[-1]) if logged else 0
        return self._skipped_before + self._skipped_batches

    def _warn_skipped(self) -> None:
        """One warning per log that saw skipped micro-batches (a non-finite loss or objective, no gradient)."""
        new = self._skipped_batches - self._skipped_logged
        self._skipped_logged = self._skipped_batches
        if new > 0 and self.is_world_process_zero():
            logger.warning(
                "by step %d: the loss or the MRP objective of %d training batch(es) was not finite (NaN/inf); "
                "skipped them (no gradient from them), %d skipped so far. Check the data (e.g. mrp_weights), the "
                "learning rate and mrp_lambda",
                self.state.global_step,
                new,
                self._skipped_total(),
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if "eval_loss" in logs else "train"
        if "loss" in logs or "eval_loss" in logs:
            sums = self.recorded_sums(mode)
            self._mrp_sums[mode] = None
            if sums["n"] > 0:
                prefix = "eval_" if mode == "eval" else ""
                logs[f"{prefix}loss_ce"] = sums["ce"] / sums["n"]
                logs[f"{prefix}loss_mrp"] = sums["objective"] / sums["n"]
                logs[f"{prefix}mean_margin"] = sums["margin"] / sums["n"]
                if self.args.mrp_settings.record.layers:  # depth, combined: the target layers' part and the rest
                    logs[f"{prefix}loss_mrp_depth"] = sums["depth"] / sums["n"]
                    logs[f"{prefix}loss_mrp_final"] = (sums["objective"] - sums["depth"]) / sums["n"]
        if "loss" in logs:
            self._warn_skipped()
            logs[SKIPPED_KEY] = self._skipped_total()
            total, count = self._ewc_logged
            if count:  # the mean EWC term of the micro-batches since the last log
                logs["loss_ewc"] = float(total) / count
                self._ewc_logged = (0.0, 0)
        super().log(logs, start_time)
