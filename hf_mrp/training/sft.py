"""MRPSFTTrainer / MRPSFTConfig: TRL's `SFTTrainer` with the MRP loss (the optional extra ``hf_mrp[trl]``).

Everything `SFTTrainer` does stays its own: dataset preparation (conversational and prompt-completion
data, chat templates, ``assistant_only_loss``, ``completion_only_loss``), packing (padding-free BFD
with ``position_ids``), PEFT through ``peft_config``, its collator and its metrics. Only the loss
changes: CE + mrp_lambda * objective from the same fused path as `MRPTrainer` (`loss.forward_with_mrp_loss`:
float32 chunks inside the output head, the model's own soft cap / logit scale, W whole under FSDP2),
over exactly the positions whose label TRL left at something other than -100. TRL's own fused LM
head stays installed but unused: it only runs when called with ``fused_lm_head=True``, which this
trainer never does. TRL's ``entropy`` and ``mean_token_accuracy`` come from the same fused pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import TrainingArguments, set_seed

from ..errors import MRPUserError
from .config import MRPArguments, MRPConfig
from .loss import forward_with_mrp_loss, without_logits
from .mrp_mixin import MRPTrainerMixin
from .run_checks import check_training_settings

MIN_TRL = "1.16"

try:
    import trl
    from packaging.version import Version
    from trl import SFTConfig, SFTTrainer
except ImportError as error:  # pragma: no cover - depends on the install
    raise MRPUserError(f"MRPSFTTrainer needs TRL >= {MIN_TRL}: pip install 'hf_mrp[trl]'") from error
if Version(trl.__version__) < Version(MIN_TRL):  # pragma: no cover - depends on the install
    raise MRPUserError(f"MRPSFTTrainer needs TRL >= {MIN_TRL}, found {trl.__version__}: pip install 'hf_mrp[trl]'")

# SmolLM2's own ChatML template with TRL's {% generation %} markers around each assistant turn, which
# `assistant_only_loss=True` needs (the shipped template has none); renders the same text.
CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class MRPSFTConfig(MRPArguments, SFTConfig):
    """`SFTConfig` plus the MRP fields (`MRPArguments`: mrp_objective, mrp_lambda, ...). Adapters come from
    ``peft_config``, as with `SFTTrainer`. The loss is TRL's default ``loss_type='nll'`` plus the objective."""

    def __post_init__(self) -> None:
        self._join_cpu_launch()
        self._no_pinning_without_accelerator()
        self._checkpointing_by_its_new_name()
        self._check_mrp_fields()
        super().__post_init__()
        check_training_settings(self)
        if self.loss_type != "nll":
            raise MRPUserError(
                f"MRPSFTConfig trains CE + mrp_lambda * objective; loss_type={self.loss_type!r} would "
                "replace that CE: use loss_type='nll' (the default)"
            )

    def _checkpointing_by_its_new_name(self) -> None:
        """TRL's configs default the deprecated alias ``gradient_checkpointing`` to True, so TrainingArguments
        (transformers 5) warned at every config that the alias is deprecated, whatever the user passed. Its value
        goes to ``activation_checkpointing`` while that is unset: what TrainingArguments does itself, unwarned."""
        for old, new in CHECKPOINTING_ALIASES:
            if getattr(self, new, False) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))


CHECKPOINTING_ALIASES = (
    ("gradient_checkpointing", "activation_checkpointing"),
    ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
)


def as_mrp_sft_config(args: TrainingArguments) -> MRPSFTConfig:
    """``args`` as an `MRPSFTConfig`: plain `TrainingArguments` and TRL's `SFTConfig` are converted as SFTTrainer
    converts them (their own values kept, the MRP fields at their defaults)."""
    if isinstance(args, MRPSFTConfig):
        return args
    if isinstance(args, MRPConfig):
        raise MRPUserError(
            "MRPSFTTrainer takes MRPSFTConfig (adapters come from peft_config), not MRPTrainer's "
            "MRPConfig: build MRPSFTConfig(...) with the same mrp_* values"
        )
    if not isinstance(args, TrainingArguments):
        raise MRPUserError(
            f"MRPSFTTrainer needs args=MRPSFTConfig(...) or TrainingArguments, got {type(args).__name__}"
        )
    values = args.to_dict()
    for key in values:
        if key.endswith("_token"):  # to_dict masks these (hub_token, SFTConfig's eos_token / pad_token)
            values[key] = getattr(args, key)
    return MRPSFTConfig(**values)


class MRPSFTTrainer(MRPTrainerMixin, SFTTrainer):
    """`SFTTrainer` whose loss is CE + mrp_lambda * MRP objective, logging ``loss_ce``, ``loss_mrp``,
    ``mean_margin`` next to TRL's ``entropy``, ``mean_token_accuracy`` and ``num_tokens``."""

    _tag_names = [*SFTTrainer._tag_names, "hf_mrp"]

    def __init__(self, model, args: MRPSFTConfig | None = None, **kwargs):
        """``model`` and ``args`` as for `SFTTrainer`; everything else by keyword (train_dataset=..., ...)."""
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = MRPSFTConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-MRP-SFT")
        args = as_mrp_sft_config(args)
        self._refuse_compute_loss_func(kwargs, "MRPSFTTrainer", "trl.SFTTrainer")
        set_seed(args.seed)  # the adapter's random init must not depend on what ran before
        super().__init__(model, args=args, **kwargs)
        parallelism = self.accelerator.parallelism_config
        if parallelism is not None and getattr(parallelism, "sp_enabled", False):
            raise MRPUserError(
                "MRPSFTTrainer does not support sequence parallelism (sp_size > 1): its loss reduction "
                "is TRL's own fused head; use data parallelism or FSDP2"
            )
        self._init_mrp_state()

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = {key: value for key, value in inputs.items() if key != "use_cache"}
        with_logits = self._logits_wanted(inputs, return_outputs)
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        labels, shift_labels = inputs.pop("labels", None), inputs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            raise MRPUserError(
                "the batch holds no labels; let MRPSFTTrainer prepare the dataset (its collator makes "
                "them), or add a labels column (-100 = no loss)"
            )
        sums, outputs = forward_with_mrp_loss(
            model,
            inputs,
            labels,
            self.args.mrp_settings,
            shift_labels=shift_labels,
            with_entropy=True,
            with_logits=with_logits,
            host_checks=self._host_checks(),
        )
        loss = self._normalized_loss(sums, num_items_in_batch)
        if self.aux_loss_enabled:  # as SFTTrainer: a per-micro-batch mean, spread over the accumulation steps
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss.to(loss.device) / steps
        loss = self._recorded_loss(sums, loss, outputs)
        self._record_sft_metrics(mode, sums, inputs, outputs)
        if return_outputs:  # the head's real logits, from the same forward, only when predictions are kept
            return loss, outputs if with_logits else without_logits(outputs)
        return loss

    def _record_sft_metrics(self, mode: str, sums, inputs: dict, outputs) -> None:
        """TRL's metrics from the fused pass: entropy and top-1 accuracy over the loss positions (a mean per
        micro-batch over all processes, as SFTTrainer logs them) and the running count of input tokens. Kept as
        device tensors (one all-reduce, no host read); `log` reads them."""
        if not self._recording:  # the mixin's flag: a forward that is no training or evaluation batch
            return
        device = sums.ce.device
        if mode == "train" and "attention_mask" in inputs:
            tokens = inputs["attention_mask"].sum()
        elif mode == "train":  # padding-free: one row of real tokens, no attention mask
            tokens = torch.full((), inputs["position_ids"].size(1), device=device)
        else:
            tokens = torch.zeros((), device=device)
        aux = outputs.aux_loss.detach() if self.aux_loss_enabled else torch.zeros((), device=device)
        local = torch.stack(
            [
                sums.entropy.double(),
                torch.as_tensor(sums.n_correct, device=device).double().reshape(()),
                sums.n_positions.double().reshape(()),
                tokens.to(device).double(),
                aux.to(device).double().reshape(()),
            ]
        )
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        entropy, correct, valid, tokens, aux = total.unbind()
        some = valid > 0
        self._metrics[mode]["entropy"].append(torch.where(some, entropy / valid.clamp(min=1), 0.0))
        self._metrics[mode]["mean_token_accuracy"].append(torch.where(some, correct / valid.clamp(min=1), 0.0))
        if mode == "train":  # TRL's _total_train_tokens, kept on the device
            counted = torch.div(tokens, self._tp_size, rounding_mode="floor")
            self._train_tokens = getattr(self, "_train_tokens", 0) + counted
        self._metrics[mode]["num_tokens"] = [getattr(self, "_train_tokens", 0)]
        if self.aux_loss_enabled:
            self._metrics[mode]["aux_loss"].append(aux / self.accelerator.num_processes)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's metrics, read from the device here (one host read per log, not one per micro-batch), then logged
        as TRL logs them."""
        places = [
            (values, index)
            for metrics in self._metrics.values()
            for values in metrics.values()
            for index, value in enumerate(values)
            if torch.is_tensor(value)
        ]
        if places:
            read = torch.stack([values[index].double() for values, index in places]).tolist()
            for (values, index), value in zip(places, read):
                values[index] = value
        tokens = self._metrics["train"].get("num_tokens")
        if tokens:
            tokens[:] = [int(value) for value in tokens]
        super().log(logs, start_time)
