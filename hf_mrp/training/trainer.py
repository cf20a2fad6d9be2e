"""MRPTrainer: a drop-in `transformers.Trainer` whose loss is CE + lambda * MRP objective.

`compute_loss` runs the model with the fused float32 loss in place of its output head's forward
(`training/loss.py`: W is whole there under FSDP / ZeRO-3, and the model's soft cap or logit scale
is applied). Everything else (optimizers, accumulation, DDP, checkpoints, logging) is
the Trainer's own.

Reliability (see `training_step`, `train`):
- a micro-batch whose loss or objective is NaN/inf is skipped (no gradient), with a warning, and
  counted in the logged ``nonfinite_skipped``; all processes agree on the skip;
- token ids outside the model's vocabulary are refused before the forward (`models.check_token_ids`);
- ``resume_from_checkpoint`` must name a complete checkpoint (one with ``trainer_state.json``);
- saved ``training_args.bin`` files (checkpoints and the Trainer's own pushes included) never hold a Hub
  token: `MRPArguments` pickles without any ``*_token`` field.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Trainer, default_data_collator, set_seed

from ..errors import MRPUserError
from .adapters import prepare_model
from .config import MRPConfig
from .dataset_checks import WEIGHTS_COLUMN, check_weights, streamed_columns
from .loss import forward_with_mrp_loss, router_aux_loss, without_logits
from .mrp_mixin import METRICS, SKIPPED_KEY, MRPTrainerMixin

__all__ = ["MRPTrainer", "METRICS", "SKIPPED_KEY", "WEIGHTS_COLUMN"]


class MRPTrainer(MRPTrainerMixin, Trainer):
    """`Trainer` with the MRP loss. Datasets hold ``input_ids``, ``labels`` (-100 = ignored) and
    optionally ``mrp_weights`` (per-token weights of the objective, aligned with ``labels``)."""

    def __init__(self, model=None, args: MRPConfig | None = None, peft_config=None, data_collator=None, **kwargs):
        if args is None:
            args = MRPConfig(output_dir="mrp-output")
        if not isinstance(args, MRPConfig):
            raise MRPUserError(f"MRPTrainer needs args=MRPConfig(...), got {type(args).__name__}")
        if model is None:
            raise MRPUserError("MRPTrainer needs a model: pass a causal LM (e.g. from hf_mrp.load_model_and_tokenizer)")
        if isinstance(model, (str, Path)):
            raise MRPUserError(
                f"MRPTrainer needs a loaded model, not the name {str(model)!r}: load it first with "
                "hf_mrp.load_model_and_tokenizer(name) or AutoModelForCausalLM.from_pretrained(name)"
            )
        self._refuse_compute_loss_func(kwargs, "MRPTrainer", "transformers.Trainer")
        for name in ("train_dataset", "eval_dataset"):
            _check_dataset(kwargs.get(name), name, columns=data_collator is None)
        set_seed(args.seed)  # the adapter's random init must not depend on what ran before
        model = prepare_model(model, args, peft_config)
        super().__init__(model=model, args=args, data_collator=data_collator or default_data_collator, **kwargs)
        self._init_mrp_state()

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        assert self._signature_columns is not None  # the call above has set them
        for column in ("labels", WEIGHTS_COLUMN):
            if column not in self._signature_columns:  # else remove_unused_columns would drop them
                self._signature_columns.append(column)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        inputs = dict(inputs)
        with_logits = self._logits_wanted(inputs, return_outputs)
        labels = inputs.pop("labels")
        weights = inputs.pop(WEIGHTS_COLUMN, None)
        sums, outputs = forward_with_mrp_loss(
            model,
            inputs,
            labels,
            self.args.mrp_settings,
            position_weights=weights,
            with_logits=with_logits,
            host_checks=self._host_checks(),
        )
        loss = self._normalized_loss(sums, num_items_in_batch)
        aux = router_aux_loss(model, outputs)
        if aux is not None:
            loss = loss + aux.to(loss.device)
        loss = self._recorded_loss(sums, loss, outputs)
        if return_outputs:
            return loss, outputs if with_logits else without_logits(outputs)
        return loss


def _check_dataset(dataset, name: str, columns: bool = True) -> None:
    """A map-style dataset needs rows and, for the default collator (``columns``), the input_ids and
    labels columns; checked before anything trains. A custom collator may make its own columns."""
    names = getattr(dataset, "column_names", None)
    if names is None and dataset is not None:
        names = streamed_columns(dataset, name)  # an IterableDataset: the columns of its first row
    if dataset is None or not isinstance(names, list):
        return
    missing = [column for column in ("input_ids", "labels") if column not in names] if columns else []
    if missing:
        raise MRPUserError(
            f"{name} lacks the column(s) {', '.join(missing)} (it has: {', '.join(names) or 'none'}); "
            "give it input_ids and labels (-100 = ignored), e.g. with hf_mrp.research.refine.training_dataset(ids)"
        )
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise MRPUserError(f"{name} has no rows; pass at least one block of token ids")
    check_weights(dataset, name)
