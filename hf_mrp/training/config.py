"""MRPConfig: TrainingArguments plus the MRP objective and the LoRA adapter it trains.

The MRP objective's fields live in `MRPArguments`, which `MRPSFTConfig` (TRL) shares."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from transformers import TrainingArguments

from ..audit.layers import parse_layer_spec
from ..errors import MRPUserError
from ..ops import OBJECTIVES
from ..ops.fused import NORMALIZATIONS

logger = logging.getLogger(__name__)


def _launched_without_accelerators(use_cpu: bool) -> bool:
    """Several processes were launched (WORLD_SIZE > 1) but there is no GPU / XPU / MPS device to give them."""
    if use_cpu or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or (xpu is not None and xpu.is_available())
                or torch.backends.mps.is_available())


@dataclass
class MRPArguments:
    """The MRP objective's fields (loss = CE + mrp_lambda * L_objective, see docs/spec.md), mixed into
    `MRPConfig` and `MRPSFTConfig` ahead of their TrainingArguments base, so both read and check them alike."""

    mrp_objective: str = field(
        default="fisher",
        metadata={"help": "Objective added to cross-entropy: 'margin' (maximize top-1 minus top-2 logit below "
                          "the threshold), 'fisher' (Fisher distance penalty over the top-k tokens, minimized) "
                          "or 'entropy' (full-vocabulary entropy)."},
    )
    mrp_lambda: float = field(default=0.6, metadata={"help": "Weight of the objective (>= 0; 0 gives plain CE)."})
    mrp_margin_threshold: float = field(
        default=1.0, metadata={"help": "tau: the margin objective only acts on positions with margin below tau (> 0)."}
    )
    mrp_margin_normalization: str = field(
        default="gated",
        metadata={"help": "How the margin objective is averaged: 'gated' divides it by the positions whose margin is "
                          "below tau (the paper's mean over gated positions, per micro-batch), 'valid' by all valid "
                          "positions like CE (exact under gradient accumulation). Other objectives: always 'valid'."},
    )
    mrp_top_k: int = field(default=5, metadata={"help": "k: tokens in the Fisher objective (2 <= k <= vocab)."})
    mrp_chunk_size: int = field(
        default=1024, metadata={"help": "Positions per float32 [chunk x vocab] logits chunk (memory vs. speed)."}
    )

    def _join_cpu_launch(self) -> None:
        """Before TrainingArguments.__post_init__: several processes on a machine without accelerators run as one
        distributed CPU job (gloo), as with --use_cpu true; else each would run as its own job, all writing one
        output folder."""
        if _launched_without_accelerators(self.use_cpu):
            logger.warning("%s processes were launched on a machine without accelerators: running them as one "
                           "distributed CPU job (gloo), as with --use_cpu true", os.environ["WORLD_SIZE"])
            self.use_cpu = True

    def _check_mrp_fields(self) -> None:
        """One clear line for each out-of-range MRP field."""
        if self.mrp_objective not in OBJECTIVES:
            raise MRPUserError(f"unknown mrp_objective {self.mrp_objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if not self.mrp_lambda >= 0:
            raise MRPUserError(f"mrp_lambda must be >= 0 (0 gives plain cross-entropy), got {self.mrp_lambda}")
        if self.mrp_margin_normalization not in NORMALIZATIONS:
            raise MRPUserError(
                f"unknown mrp_margin_normalization {self.mrp_margin_normalization!r}; choose one of "
                f"{', '.join(NORMALIZATIONS)}"
            )
        if not self.mrp_margin_threshold > 0:
            raise MRPUserError(f"mrp_margin_threshold (tau) must be > 0, got {self.mrp_margin_threshold}")
        if self.mrp_top_k < 2:
            raise MRPUserError(f"mrp_top_k must be at least 2 (a margin needs two tokens), got {self.mrp_top_k}")
        if self.mrp_chunk_size < 1:
            raise MRPUserError(f"mrp_chunk_size must be positive, got {self.mrp_chunk_size}")


@dataclass
class MRPConfig(MRPArguments, TrainingArguments):
    """Training arguments for `MRPTrainer`: the MRP fields (`MRPArguments`) and the LoRA adapter it trains."""

    use_lora: bool = field(
        default=True,
        metadata={"help": "Train LoRA adapters (built from the lora_* fields) unless a peft_config is passed; "
                          "False trains the model's own weights (the paper's full-model scope)."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names to adapt, e.g. q_proj v_proj; 'all-linear' adapts every linear layer "
                          "of the decoder blocks (not lm_head)."},
    )
    lora_layers: str | None = field(
        default=None,
        metadata={"help": "0-based decoder layers to adapt: 'all', a range like '20-29' or a list like '3,5,7'; "
                          "default all."},
    )

    def __post_init__(self) -> None:
        self._join_cpu_launch()
        if isinstance(self.lora_target_modules, str):  # 'all-linear' / 'q_proj' mean the one-element list
            self.lora_target_modules = [self.lora_target_modules]
        super().__post_init__()
        self._check_mrp_fields()
        if self.lora_r < 1 or not 0 <= self.lora_dropout < 1:
            raise MRPUserError(f"lora_r must be >= 1 and lora_dropout in [0, 1), got {self.lora_r}, {self.lora_dropout}")
        if self.lora_layers is not None and self.lora_layers.strip().lower() != "all":
            parse_layer_spec(self.lora_layers, n_layers=10**6)  # syntax now; the range is checked against the model

    def lora_layer_indices(self, n_layers: int) -> list[int] | None:
        """The adapted layers as 0-based indices (None: all layers), checked against the model."""
        if self.lora_layers is None or self.lora_layers.strip().lower() == "all":
            return None
        return parse_layer_spec(self.lora_layers, n_layers)
