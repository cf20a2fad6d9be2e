"""MRPTrainer: a drop-in `transformers.Trainer` whose loss is CE + lambda * MRP objective.

`compute_loss` runs the model with its output head bypassed (final hidden states, no logits)
and hands the hidden states and W to `ops.mrp_loss_sums`, which computes CE and the objective
in float32 chunks. Everything else (optimizers, accumulation, DDP, checkpoints, logging) is
the Trainer's own.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer, default_data_collator, set_seed

from ..errors import MRPUserError
from ..models import head_bypassed, output_head
from ..ops import mrp_loss_sums
from .adapters import prepare_model
from .callbacks import MRPAuditCallback
from .config import MRPConfig

WEIGHTS_COLUMN = "mrp_weights"
METRICS = ("loss_ce", "loss_mrp", "mean_margin")


class MRPTrainer(Trainer):
    """`Trainer` with the MRP loss. Datasets hold ``input_ids``, ``labels`` (-100 = ignored) and
    optionally ``mrp_weights`` (per-token weights of the objective, aligned with ``labels``)."""

    def __init__(self, model=None, args: MRPConfig | None = None, peft_config=None, data_collator=None, **kwargs):
        if args is None:
            args = MRPConfig(output_dir="mrp-output")
        if not isinstance(args, MRPConfig):
            raise MRPUserError(f"MRPTrainer needs args=MRPConfig(...), got {type(args).__name__}")
        if model is None:
            raise MRPUserError("MRPTrainer needs a model: pass a causal LM (e.g. from hf_mrp.load_model_and_tokenizer)")
        set_seed(args.seed)  # the adapter's random init must not depend on what ran before
        model = prepare_model(model, args, peft_config)
        vocab = output_head(model)[0].shape[0]
        if args.mrp_top_k > vocab:
            raise MRPUserError(f"mrp_top_k ({args.mrp_top_k}) exceeds the vocabulary ({vocab}); lower it")
        super().__init__(model=model, args=args, data_collator=data_collator or default_data_collator, **kwargs)
        # The loss is a sum over valid shifted positions / num_items_in_batch, like the models' own CE:
        # make the Trainer count those items (over labels[..., 1:]) and skip its own GA rescaling.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._mrp_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        for callback in list(self.callback_handler.callbacks):
            if isinstance(callback, MRPAuditCallback):
                self.callback_handler.callbacks.remove(callback)
                callback.attach(self)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for column in ("labels", WEIGHTS_COLUMN):
            if column not in self._signature_columns:  # else remove_unused_columns would drop them
                self._signature_columns.append(column)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        args: MRPConfig = self.args
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        weights = inputs.pop(WEIGHTS_COLUMN, None)
        unwrapped = self.accelerator.unwrap_model(model)
        with head_bypassed(unwrapped):
            outputs = model(**inputs, use_cache=False)
        weight, bias = output_head(unwrapped)
        sums = mrp_loss_sums(
            outputs.logits[:, :-1], weight, labels[:, 1:], bias=bias,
            objective=args.mrp_objective, lam=args.mrp_lambda, tau=args.mrp_margin_threshold,
            top_k=args.mrp_top_k, chunk_size=args.mrp_chunk_size,
            position_weights=None if weights is None else weights[:, 1:],
        )
        if num_items_in_batch is None:
            loss = sums.total / max(sums.n_positions, 1)
        else:
            loss = sums.total / num_items_in_batch
            if args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        self._record(sums)
        if return_outputs:
            outputs.logits = None  # these were hidden states, not logits
            return loss, outputs
        return loss

    def _record(self, sums) -> None:
        """Accumulate sums over processes, so logged means are exact position-weighted means."""
        local = torch.stack(
            [sums.ce.detach(), sums.objective.detach(), sums.margin.detach(),
             torch.tensor(float(sums.n_positions), device=sums.ce.device)]
        ).double()
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        mode = "train" if self.model.training else "eval"
        ce, objective, margin, n = total.tolist()
        for key, value in zip(("ce", "objective", "margin", "n"), (ce, objective, margin, n)):
            self._mrp_sums[mode][key] += value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if "eval_loss" in logs else "train"
        sums = self._mrp_sums[mode]
        if sums["n"] > 0 and ("loss" in logs or "eval_loss" in logs):
            prefix = "eval_" if mode == "eval" else ""
            logs[f"{prefix}loss_ce"] = sums["ce"] / sums["n"]
            logs[f"{prefix}loss_mrp"] = sums["objective"] / sums["n"]
            logs[f"{prefix}mean_margin"] = sums["margin"] / sums["n"]
            self._mrp_sums[mode] = defaultdict(float)
        super().log(logs, start_time)
