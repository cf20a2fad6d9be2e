"""MRPConfig: TrainingArguments plus the MRP objective and the LoRA adapter it trains.

The MRP objective's fields live in `MRPArguments`, which `MRPSFTConfig` (TRL) shares; the checks of a run's
settings that both configs make after TrainingArguments' own are `run_checks.py`'s."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import TrainingArguments

from ..errors import MRPUserError, require_number
from ..models.layers import parse_layer_spec
from ..ops import LOGITS_PRECISIONS, MRPSettings
from .run_checks import check_fisher_memory, check_training_settings, memory_limit

logger = logging.getLogger(__name__)


def _launched_without_accelerators(use_cpu: bool) -> bool:
    """Several processes were launched (WORLD_SIZE > 1) but there is no GPU / XPU / MPS device to give them."""
    if use_cpu or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    xpu = getattr(torch, "xpu", None)
    return not (
        torch.cuda.is_available() or (xpu is not None and xpu.is_available()) or torch.backends.mps.is_available()
    )


DEFAULTS = MRPSettings()
# the fields MRPSettings is built from (TrainingArguments' label_smoothing_factor too)
SETTINGS_FIELDS = frozenset(
    {
        "mrp_objective",
        "mrp_lambda",
        "mrp_margin_threshold",
        "mrp_top_k",
        "mrp_chunk_size",
        "mrp_margin_normalization",
        "label_smoothing_factor",
        "mrp_logits_precision",
    }
)


if TYPE_CHECKING:  # the type checker sees the TrainingArguments fields the mixin reads; at run time a plain base
    _ArgumentsBase = TrainingArguments
else:
    _ArgumentsBase = object


@dataclass
class MRPArguments(_ArgumentsBase):
    """The MRP objective's fields (loss = CE + mrp_lambda * L_objective, see docs/spec.md), mixed into
    `MRPConfig` and `MRPSFTConfig` ahead of their TrainingArguments base, so both read and check them alike."""

    mrp_objective: str = field(
        default=DEFAULTS.objective,
        metadata={
            "help": "Objective added to cross-entropy: 'margin' (maximize top-1 minus top-2 logit below "
            "the threshold), 'fisher' (Fisher distance penalty over the top-k tokens, minimized) "
            "or 'entropy' (full-vocabulary entropy)."
        },
    )
    mrp_lambda: float = field(
        default=DEFAULTS.lam, metadata={"help": "Weight of the objective (>= 0; 0 gives plain CE)."}
    )
    mrp_margin_threshold: float = field(
        default=DEFAULTS.tau,
        metadata={"help": "tau: the margin objective only acts on positions with margin below tau (> 0)."},
    )
    mrp_margin_normalization: str = field(
        default=DEFAULTS.normalization,
        metadata={
            "help": "How the margin objective is averaged: 'gated' divides it by the positions whose margin is "
            "below tau (the paper's mean over gated positions, per micro-batch), 'valid' by all valid "
            "positions like CE (exact under gradient accumulation). Other objectives: always 'valid'."
        },
    )
    mrp_top_k: int = field(
        default=DEFAULTS.top_k, metadata={"help": "k: tokens in the Fisher objective (2 <= k <= vocab)."}
    )
    mrp_chunk_size: int = field(
        default=DEFAULTS.chunk_size,
        metadata={"help": "Positions per float32 [chunk x vocab] logits chunk (memory vs. speed)."},
    )
    mrp_logits_precision: str = field(
        default=DEFAULTS.precision,
        metadata={
            "help": "Precision of the fused loss' head matmuls: 'float32' (default: float32 logits and "
            "gradients whatever bf16 / fp16 autocast or the model's dtype) or 'bfloat16' (opt-in, "
            "speed over the float32 guarantee: h, W and the logits' gradient rounded to bfloat16 "
            "operands, products and sums in float32, float32 logits; tensor cores on CUDA). The "
            "audit is always float32.",
            "choices": list(LOGITS_PRECISIONS),
        },
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
        settings = self._built_mrp_settings()
        if settings.objective == "fisher":
            check_fisher_memory(settings.top_k, settings.chunk_size, memory_limit(self.use_cpu))
        self.mrp_settings = settings

    def _built_mrp_settings(self) -> MRPSettings:
        return MRPSettings(
            self.mrp_objective,
            self.mrp_lambda,
            self.mrp_margin_threshold,
            self.mrp_top_k,
            self.mrp_chunk_size,
            self.mrp_margin_normalization,
            self.label_smoothing_factor,
            self.mrp_logits_precision,
        )

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in SETTINGS_FIELDS and "mrp_settings" in self.__dict__:  # built already: build and check anew
            self._check_mrp_fields()


@dataclass
class MRPConfig(MRPArguments, TrainingArguments):
    """Training arguments for `MRPTrainer`: the MRP fields (`MRPArguments`) and the LoRA adapter it trains."""

    use_lora: bool = field(
        default=True,
        metadata={
            "help": "Train LoRA adapters (built from the lora_* fields) unless a peft_config is passed; "
            "False trains the model's own weights (the paper's full-model scope)."
        },
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
        _check_training_steps(self)

    def lora_layer_indices(self, n_layers: int) -> list[int] | None:
        """The adapted layers as 0-based indices (None: all layers), checked against the model."""
        if self.lora_layers is None or self.lora_layers.strip().lower() == "all":
            return None
        return parse_layer_spec(self.lora_layers, n_layers)


def _check_numbers(config: MRPConfig) -> None:
    """Types and finiteness a command line cannot get wrong but Python callers can ('0.5', 2.5, inf)."""
    for name in ("lora_alpha", "learning_rate"):
        require_number(name, getattr(config, name))
    for name in ("lora_r", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps"):
        require_number(name, getattr(config, name), integer=True)
    if config.lora_layers is not None and not isinstance(config.lora_layers, str):
        raise MRPUserError(
            f"lora_layers must be a string such as '1,2', '20-29' or 'all', got "
            f"{type(config.lora_layers).__name__} {config.lora_layers!r}"
        )


def _check_training_steps(config: MRPConfig) -> None:
    if config.max_steps == 0 or config.max_steps < -1:
        raise MRPUserError(
            f"max_steps must be a positive number of optimizer steps (or -1: train for "
            f"num_train_epochs), got {config.max_steps}"
        )
    if config.learning_rate < 0:
        raise MRPUserError(f"learning_rate must be >= 0, got {config.learning_rate}; a negative rate climbs the loss")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(config, name) < 1:
            raise MRPUserError(f"{name} must be at least 1, got {getattr(config, name)}")
