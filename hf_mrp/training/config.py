"""MRPConfig: TrainingArguments plus the MRP objective and the LoRA adapter it trains.

The MRP objective's fields live in `MRPArguments`, which `MRPSFTConfig` (TRL) shares; the checks of a run's
settings that both configs make after TrainingArguments' own are `run_checks.py`'s."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainingArguments

from ..errors import MRPUserError, require_number
from ..models.layers import parse_layer_spec
from ..ops import MRPSettings
from ..ops.settings import CONFIG_FIELDS
from .run_checks import check_objective_memory, check_training_settings, memory_limit
from .scopes import TRAINABLE_SCOPES

logger = logging.getLogger(__name__)


def _launched_without_accelerators(use_cpu: bool) -> bool:
    """Several processes were launched (WORLD_SIZE > 1) but there is no GPU / XPU / MPS device to give them."""
    if use_cpu or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    xpu = getattr(torch, "xpu", None)
    return not (
        torch.cuda.is_available() or (xpu is not None and xpu.is_available()) or torch.backends.mps.is_available()
    )


def _settings_fields() -> list[tuple[str, type, Any]]:
    """The configs' ``mrp_*`` fields, one per `MRPSettings` field (its default and help, defined there once);
    ``label_smoothing_factor`` is TrainingArguments' own."""
    types = typing.get_type_hints(MRPSettings)
    made = []
    for item in dataclasses.fields(MRPSettings):
        name = item.metadata["config"]
        if name.startswith("mrp_"):
            metadata = {key: value for key, value in item.metadata.items() if key != "config"}
            made.append((name, types[item.name], field(default=item.default, metadata=metadata)))
    return made


if TYPE_CHECKING:  # the type checker sees the TrainingArguments fields the mixin reads; at run time a plain base
    _ArgumentsBase = TrainingArguments
else:
    _ArgumentsBase = object
# The mrp_* fields as a dataclass base (typed Any: its fields are generated from MRPSettings)
_SettingsFields: Any = dataclasses.make_dataclass("MRPSettingsFields", _settings_fields())


@dataclass
class MRPArguments(_SettingsFields, _ArgumentsBase):
    """The MRP objective's fields (loss = mrp_ce_weight * CE + mrp_lambda * L_objective, see docs/spec.md), one per
    `MRPSettings` field, mixed into `MRPConfig` and `MRPSFTConfig` ahead of their TrainingArguments base, so both
    read and check them alike."""

    mrp_ewc_lambda: float = field(
        default=0.0,
        metadata={
            "help": "EWC protection (Kirkpatrick et al. 2017): adds mrp_ewc_lambda / 2 * sum F (theta - theta*)^2 "
            "over the trained weights, theta* where training starts, F the diagonal Fisher of the CE there "
            "(logged as loss_ewc); 0 (default) turns it off. One process or DDP; not with a resume."
        },
    )
    mrp_ewc_batches: int = field(
        default=8, metadata={"help": "Training batches the EWC Fisher is estimated from, at the start (>= 1)."}
    )

    def __getstate__(self) -> dict:
        """Pickled (``training_args.bin`` of every save, checkpoint and Trainer push) without any Hub token."""
        return {name: None if name.endswith("_token") else value for name, value in self.__dict__.items()}

    def __copy__(self) -> MRPArguments:  # copies keep the token: only pickles drop it
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict) -> MRPArguments:
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def _join_cpu_launch(self) -> None:
        """Before TrainingArguments.__post_init__: several processes on a machine without accelerators run as one
        distributed CPU job (gloo), as with --use_cpu true; else each would run as its own job, all writing one
        output folder."""
        if _launched_without_accelerators(self.use_cpu):
            logger.warning(
                "%s processes were launched on a machine without accelerators: running them as one "
                "distributed CPU job (gloo), as with --use_cpu true",
                os.environ["WORLD_SIZE"],
            )
            self.use_cpu = True

    def _no_pinning_without_accelerator(self) -> None:
        """Before TrainingArguments.__post_init__: ``dataloader_pin_memory`` off where torch has no accelerator to
        pin for. The DataLoader pins only when ``torch.accelerator.is_available()``, so this changes nothing but
        torch's UserWarning at every epoch that the pinning it was asked for will not happen."""
        if self.dataloader_pin_memory and not torch.accelerator.is_available():
            self.dataloader_pin_memory = False

    def _check_mrp_fields(self) -> None:
        """One clear line for each bad MRP field; the one check both configs (`MRPConfig`, `MRPSFTConfig`) run,
        before their TrainingArguments base, so they refuse exactly the same settings with the same words. Builds
        ``mrp_settings``, the checked `MRPSettings` the loss takes whole (rebuilt, and checked, when a field
        changes later)."""
        settings = MRPSettings.from_config(self)
        check_objective_memory(settings, memory_limit(self.use_cpu))
        require_number("mrp_ewc_lambda", self.mrp_ewc_lambda)
        require_number("mrp_ewc_batches", self.mrp_ewc_batches, integer=True)
        if not (0 <= self.mrp_ewc_lambda < float("inf")) or self.mrp_ewc_batches < 1:
            raise MRPUserError(
                f"mrp_ewc_lambda must be a finite number >= 0 (0: no EWC) and mrp_ewc_batches >= 1, got "
                f"{self.mrp_ewc_lambda} and {self.mrp_ewc_batches}"
            )
        self.mrp_settings = settings

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in CONFIG_FIELDS and "mrp_settings" in self.__dict__:  # built already: build and check anew
            self._check_mrp_fields()


@dataclass
class MRPConfig(MRPArguments, TrainingArguments):
    """Training arguments for `MRPTrainer`: the MRP fields (`MRPArguments`) and the LoRA adapter it trains."""

    use_lora: bool = field(
        default=True,
        metadata={
            "help": "Train LoRA adapters (built from the lora_* fields) unless a peft_config is passed; "
            "False trains the model's own weights (the paper's full-model scope: trainable_scope 'full')."
        },
    )
    trainable_scope: str = field(
        default="lora",
        metadata={
            "help": "What trains: 'lora' (an adapter, the lora_* fields), or the model's own weights in place, "
            "the rest frozen, as the paper's released code offers: 'last_n_blocks' (the last trainable_last_n "
            "decoder blocks and the final norm), 'final_norm', 'embeddings' (input), 'lm_head' (the output W; "
            "the same tensor when embeddings are tied) or 'full'.",
            "choices": list(TRAINABLE_SCOPES),
        },
    )
    trainable_last_n: int = field(
        default=1, metadata={"help": "Decoder blocks (from the last) that trainable_scope 'last_n_blocks' trains."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Module names to adapt, e.g. q_proj v_proj; 'all-linear' adapts every linear layer "
            "of the decoder blocks (not lm_head)."
        },
    )
    lora_layers: str | None = field(
        default=None,
        metadata={
            "help": "0-based decoder layers to adapt: 'all', a range like '20-29' or a list like '3,5,7'; default all."
        },
    )

    def __post_init__(self) -> None:
        self._join_cpu_launch()
        self._no_pinning_without_accelerator()
        if isinstance(self.lora_target_modules, str):  # 'all-linear' / 'q_proj' mean the one-element list
            self.lora_target_modules = [self.lora_target_modules]
        self._check_mrp_fields()
        _check_numbers(self)  # before TrainingArguments, which would fail on them with a traceback
        super().__post_init__()
        check_training_settings(self)
        if self.lora_r < 1 or not 0 <= self.lora_dropout < 1:
            raise MRPUserError(
                f"lora_r must be >= 1 and lora_dropout in [0, 1), got {self.lora_r}, {self.lora_dropout}"
            )
        if not self.lora_alpha > 0:
            raise MRPUserError(
                f"lora_alpha must be > 0 (the adapter's output is scaled by lora_alpha / lora_r; 0 "
                f"makes it do nothing), got {self.lora_alpha}; the usual choice is 2 x lora_r"
            )
        if self.lora_layers is not None and self.lora_layers.strip().lower() != "all":
            parse_layer_spec(self.lora_layers, n_layers=10**6)  # syntax now; the range is checked against the model
        self._settle_trainable_scope()

    def _settle_trainable_scope(self) -> None:
        """One answer to "what trains": use_lora False is the older spelling of trainable_scope 'full', and a scope
        other than 'lora' trains no adapter (use_lora becomes False)."""
        if self.trainable_scope not in TRAINABLE_SCOPES:
            raise MRPUserError(
                f"trainable_scope must be one of {', '.join(TRAINABLE_SCOPES)}, got {self.trainable_scope!r}"
            )
        if self.trainable_scope == "lora" and not self.use_lora:
            self.trainable_scope = "full"
        self.use_lora = self.trainable_scope == "lora"
        if self.trainable_last_n < 1:
            raise MRPUserError(f"trainable_last_n must be >= 1, got {self.trainable_last_n}")

    def lora_layer_indices(self, n_layers: int) -> list[int] | None:
        """The adapted layers as 0-based indices (None: all layers), checked against the model."""
        if self.lora_layers is None or self.lora_layers.strip().lower() == "all":
            return None
        return parse_layer_spec(self.lora_layers, n_layers)


def _check_numbers(config: MRPConfig) -> None:
    """Types and finiteness a command line cannot get wrong but Python callers can ('0.5', 2.5, inf)."""
    for name in ("lora_alpha", "learning_rate"):
        require_number(name, getattr(config, name))
    integers = ("lora_r", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "trainable_last_n")
    for name in integers:
        require_number(name, getattr(config, name), integer=True)
    if config.lora_layers is not None and not isinstance(config.lora_layers, str):
        raise MRPUserError(
            f"lora_layers must be a string such as '1,2', '20-29' or 'all', got "
            f"{type(config.lora_layers).__name__} {config.lora_layers!r}"
        )
