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
from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from ..errors import MRPUserError
from ..models import probe_logit_transform, vocab_size
from .checkpoints import check_resume_target
from .divergence import check_weights, count_nonfinite_batch
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
        self._mrp_sums: dict[str, defaultdict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._guard_nonfinite = False  # on while training_step runs compute_loss
        self._skip_batch = False  # set by compute_loss: this micro-batch's loss was not finite (on some rank)
        self._nonfinite_skipped = 0  # skipped micro-batches in this process's training
        self._skipped_before: int | None = None  # the count logged before a resume (read from the restored log history)
        self._loss_only_prediction = False  # set by prediction_step: the evaluation needs no logits
        probe_logit_transform(unwrap(self.model))
        for callback in list(self.callback_handler.callbacks):
            if callable(getattr(callback, "attach", None)):  # it logs through its trainer: attached ahead of reporters
                self.callback_handler.callbacks.remove(callback)
                callback.attach(self)

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
            return sums.total / max(sums.n_positions, 1)
        # a batch without a single valid label sums to 0: keep 0 / 0 from becoming NaN
        items = num_items_in_batch
        items = items.clamp(min=1) if torch.is_tensor(items) else max(items, 1)
        loss = sums.total / items
        if self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return loss

    def _recorded_loss(self, sums, loss: torch.Tensor, outputs) -> torch.Tensor:
        """Record the sums; inside a training step, a loss that is not finite on some process becomes an exact zero
        over the same forward graph (every process still runs its backward: DDP and accumulation stay in step)."""
        guarded = self._guard_nonfinite and self.model.training
        finite = self._record(sums, loss, keep_nonfinite=not guarded)
        if guarded and not finite:
            self._skip_batch = True
            return outputs.logits.sum() * 0.0
        return loss

    def _record(self, sums, loss: torch.Tensor, keep_nonfinite: bool = True) -> bool:
        """Accumulate sums over processes, so logged means are exact position-weighted means.

        Returns whether the loss and the objective are finite on every process (one all-reduce carries
        both the sums and that flag, so all processes take the same decision). Non-finite sums are
        not accumulated unless ``keep_nonfinite``.
        """
        parts = torch.stack([sums.ce.detach(), sums.objective.detach(), loss.detach().float()])
        nonfinite = (~torch.isfinite(parts)).any().double()
        local = torch.stack(
            [
                sums.ce.detach().double(),
                sums.objective.detach().double(),
                sums.margin.detach().double(),
                torch.tensor(float(sums.n_positions), device=sums.ce.device, dtype=torch.float64),
                nonfinite,
            ]
        )
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        mode = "train" if self.model.training else "eval"
        ce, objective, margin, n, flags = total.tolist()
        finite = flags == 0
        if finite or keep_nonfinite:
            for key, value in zip(("ce", "objective", "margin", "n"), (ce, objective, margin, n)):
                self._mrp_sums[mode][key] += value
        return finite

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, refusing a missing or incomplete checkpoint with a message that names the fix, and
        failing (divergence.TrainingDiverged) when the final weights are not finite."""
        check_resume_target(resume_from_checkpoint, self.args.output_dir)
        output = super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )
        check_weights(self)  # the last update too: a run that ends with non-finite weights is no success
        return output

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """The Trainer's step, with non-finite micro-batches skipped.

        When the loss or the objective of a micro-batch is NaN/inf on any process, every process
        backpropagates an exact zero instead (no gradient from that micro-batch; the accumulation and
        DDP all-reduce go on as usual, and the step's ``num_items_in_batch`` still counts its items),
        sets non-finite gradient entries to 0, warns, and returns a zero loss, so the logged ``loss``
        stays finite. ``nonfinite_skipped`` in the logs counts the skipped micro-batches.

        Divergence stops the run (divergence.TrainingDiverged, one line): trainable weights that an update made
        non-finite, or MAX_NONFINITE_STEPS steps in a row of nothing but non-finite batches.
        """
        check_weights(self)
        self._guard_nonfinite, self._skip_batch = True, False
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._guard_nonfinite = False
        count_nonfinite_batch(self, self._skip_batch)
        if not self._skip_batch:
            return loss
        self._skip_batch = False
        self._nonfinite_skipped += 1
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.grad is not None:
                    torch.nan_to_num_(parameter.grad, nan=0.0, posinf=0.0, neginf=0.0)
        if self.is_world_process_zero():
            logger.warning(
                "step %d: the loss or the MRP objective of a training batch is not finite (NaN/inf); skipped it "
                "(no gradient from it), %d skipped so far. Check the data (e.g. mrp_weights), the learning rate "
                "and mrp_lambda",
                self.state.global_step + 1,
                self._skipped_total(),
            )
        return torch.zeros_like(loss)

    def _skipped_total(self) -> int:
        """Skipped micro-batches of the whole run: this process's count plus the count logged before a resume."""
        if self._skipped_before is None:
            logged = [row[SKIPPED_KEY] for row in self.state.log_history if SKIPPED_KEY in row]
            self._skipped_before = int(logged[-1]) if logged else 0
        return self._skipped_before + self._nonfinite_skipped

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if "eval_loss" in logs else "train"
        sums = self._mrp_sums[mode]
        if sums["n"] > 0 and ("loss" in logs or "eval_loss" in logs):
            prefix = "eval_" if mode == "eval" else ""
            logs[f"{prefix}loss_ce"] = sums["ce"] / sums["n"]
            logs[f"{prefix}loss_mrp"] = sums["objective"] / sums["n"]
            logs[f"{prefix}mean_margin"] = sums["margin"] / sums["n"]
            self._mrp_sums[mode] = defaultdict(float)
        if "loss" in logs:
            logs[SKIPPED_KEY] = self._skipped_total()
        super().log(logs, start_time)
