"""MRPTrainer: a drop-in `transformers.Trainer` whose loss is CE + lambda * MRP objective.

`compute_loss` runs the model with the fused float32 loss in place of its output head's forward
(`training/loss.py`: W is whole there under FSDP / ZeRO-3, and the model's soft cap or logit scale
is applied). Everything else (optimizers, accumulation, DDP, checkpoints, logging) is
the Trainer's own.

Reliability (see `training_step`, `train`, `save_model`):
- a micro-batch whose loss or objective is NaN/inf is skipped (no gradient), with a warning, and
  counted in the logged ``nonfinite_skipped``; all processes agree on the skip;
- token ids outside the model's vocabulary are refused before the forward (`models.check_token_ids`);
- ``resume_from_checkpoint`` must name a complete checkpoint (one with ``trainer_state.json``);
- saved ``training_args.bin`` files (checkpoints included) never hold a Hub token.
"""

from __future__ import annotations

import copy
import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, default_data_collator, set_seed

from ..errors import MRPUserError
from ..models import output_head
from .adapters import prepare_model
from .callbacks import MRPAuditCallback
from .config import MRPConfig
from .loss import MRPLossSettings, forward_with_mrp_loss, router_aux_loss
from .dataset_checks import check_weights, streamed_columns

logger = logging.getLogger(__name__)

WEIGHTS_COLUMN = "mrp_weights"
METRICS = ("loss_ce", "loss_mrp", "mean_margin")
SKIPPED_KEY = "nonfinite_skipped"
TRAINING_ARGS_FILE = "training_args.bin"
CHECKPOINT_COMPLETE_FILE = "trainer_state.json"  # the Trainer writes it last into a checkpoint


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
        if isinstance(model, (str, Path)):
            raise MRPUserError(
                f"MRPTrainer needs a loaded model, not the name {str(model)!r}: load it first with "
                "hf_mrp.load_model_and_tokenizer(name) or AutoModelForCausalLM.from_pretrained(name)"
            )
        for name in ("train_dataset", "eval_dataset"):
            _check_dataset(kwargs.get(name), name, columns=data_collator is None)
        set_seed(args.seed)  # the adapter's random init must not depend on what ran before
        model = prepare_model(model, args, peft_config)
        vocab = output_head(model)[0].shape[0]
        self._vocab_size = int(vocab)
        if args.mrp_top_k > vocab:
            raise MRPUserError(f"mrp_top_k ({args.mrp_top_k}) exceeds the vocabulary ({vocab}); lower it")
        super().__init__(model=model, args=args, data_collator=data_collator or default_data_collator, **kwargs)
        # The loss is a sum over valid shifted positions / num_items_in_batch, like the models' own CE:
        # make the Trainer count those items (over labels[..., 1:]) and skip its own GA rescaling.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._mrp_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._guard_nonfinite = False  # on while training_step runs compute_loss
        self._skip_batch = False  # set by compute_loss: this micro-batch's loss was not finite (on some rank)
        self._nonfinite_skipped = 0  # skipped micro-batches in this process's training
        self._skipped_before = None  # the count logged before a resume (read from the restored log history)
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
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        weights = inputs.pop(WEIGHTS_COLUMN, None)
        sums, outputs = forward_with_mrp_loss(model, inputs, labels, MRPLossSettings.from_config(self.args),
                                              position_weights=weights)
        if num_items_in_batch is None:
            loss = sums.total / max(sums.n_positions, 1)
        else:
            # a batch without a single valid label sums to 0: keep 0 / 0 from becoming NaN
            items = num_items_in_batch
            items = items.clamp(min=1) if torch.is_tensor(items) else max(items, 1)
            loss = sums.total / items
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        aux = router_aux_loss(model, outputs)
        if aux is not None:
            loss = loss + aux.to(loss.device)
        guarded = self._guard_nonfinite and self.model.training
        finite = self._record(sums, loss, keep_nonfinite=not guarded)
        if guarded and not finite:
            # Backpropagate an exact zero through the same forward graph instead of the non-finite loss: every
            # process still runs its backward, so DDP's gradient all-reduce (and accumulation) stays in step.
            self._skip_batch = True
            loss = outputs.logits.sum() * 0.0
        if return_outputs:
            outputs.logits = None  # zeros tied to the loss, not logits
            return loss, outputs
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
            [sums.ce.detach().double(), sums.objective.detach().double(), sums.margin.detach().double(),
             torch.tensor(float(sums.n_positions), device=sums.ce.device, dtype=torch.float64), nonfinite]
        )
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        mode = "train" if self.model.training else "eval"
        ce, objective, margin, n, flags = total.tolist()
        finite = flags == 0
        if finite or keep_nonfinite:
            for key, value in zip(("ce", "objective", "margin", "n"), (ce, objective, margin, n)):
                self._mrp_sums[mode][key] += value
        return finite

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """The Trainer's step, with non-finite micro-batches skipped.

        When the loss or the objective of a micro-batch is NaN/inf on any process, every process
        backpropagates an exact zero instead (no gradient from that micro-batch; the accumulation and
        DDP all-reduce go on as usual, and the step's ``num_items_in_batch`` still counts its items),
        sets non-finite gradient entries to 0, warns, and returns a zero loss, so the logged ``loss``
        stays finite. ``nonfinite_skipped`` in the logs counts the skipped micro-batches.
        """
        self._guard_nonfinite, self._skip_batch = True, False
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._guard_nonfinite = False
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
                "and mrp_lambda", self.state.global_step + 1, self._skipped_total(),
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

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, refusing a missing or incomplete checkpoint with a message that names the fix."""
        if isinstance(resume_from_checkpoint, (str, Path)):
            _check_checkpoint(Path(resume_from_checkpoint), Path(self.args.output_dir))
        elif resume_from_checkpoint is True and not _complete_checkpoints(Path(self.args.output_dir)):
            raise MRPUserError(
                f"resume_from_checkpoint=True, but {self.args.output_dir} holds no complete checkpoint-N folder; "
                "train from scratch (drop the flag) or pass the output_dir of the interrupted run"
            )
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model` (also used for every checkpoint), with the Hub token kept out of training_args.bin."""
        super().save_model(output_dir, _internal_call=_internal_call)
        path = Path(output_dir or self.args.output_dir) / TRAINING_ARGS_FILE
        if self.args.should_save and path.is_file():
            redacted = _redacted_arguments(self.args)
            if redacted is not self.args:
                torch.save(redacted, path)


def _redacted_arguments(args):
    """A copy of ``args`` whose *_token fields are None (``args`` itself when none is set)."""
    tokens = [name for name in vars(args) if name.endswith("_token") and getattr(args, name)]
    if not tokens:
        return args
    redacted = copy.copy(args)
    for name in tokens:
        object.__setattr__(redacted, name, None)
    return redacted


def _is_complete_checkpoint(folder: Path) -> bool:
    """trainer_state.json is the last file the Trainer writes into a checkpoint: whole JSON = complete."""
    try:
        json.loads((folder / CHECKPOINT_COMPLETE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def _complete_checkpoints(output_dir: Path) -> list[Path]:
    def step(folder: Path) -> int:
        suffix = folder.name.rsplit("-", 1)[-1]
        return int(suffix) if suffix.isdigit() else -1

    return sorted((p for p in output_dir.glob("checkpoint-*") if _is_complete_checkpoint(p)), key=step)


def _check_checkpoint(folder: Path, output_dir: Path) -> None:
    """A checkpoint to resume from must be a folder whose trainer_state.json (written last) is whole."""
    available = _complete_checkpoints(output_dir)
    hint = (f"complete checkpoints in {output_dir}: {', '.join(p.name for p in available)}" if available
            else f"{output_dir} holds no complete checkpoint; train from scratch (drop --resume_from_checkpoint)")
    if not folder.is_dir():
        raise MRPUserError(
            f"resume_from_checkpoint {str(folder)!r} is not a folder; pass a checkpoint-N folder ({hint})"
        )
    if not _is_complete_checkpoint(folder):
        raise MRPUserError(
            f"checkpoint {folder} is incomplete ({CHECKPOINT_COMPLETE_FILE} is missing or cut short: the run stopped "
            f"while saving it); resume from an earlier checkpoint ({hint})"
        ) from None


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
            "give it input_ids and labels (-100 = ignored), e.g. with hf_mrp.refine.training_dataset(ids)"
        )
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise MRPUserError(f"{name} has no rows; pass at least one block of token ids")
    check_weights(dataset, name)
