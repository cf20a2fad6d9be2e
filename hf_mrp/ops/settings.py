"""The MRP loss' settings, defined once: one frozen, checked object from the config to the fused autograd Function.

Each field of `MRPSettings` names the config field it is read from (``metadata["config"]``) and carries that
field's help: `MRPConfig` and `MRPSFTConfig` generate their ``mrp_*`` fields from it (training/config.py) and build
it once from them (and from TrainingArguments' ``label_smoothing_factor``); the loss and `mrp_loss_sums` take it
whole. A new loss setting is one field here. Its refusals name the config fields, so a bad setting reads the same
from every door.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import MRPUserError, require_number
from .objectives import Objective, objective, objectives_help
from .precision import LOGITS_PRECISIONS

NORMALIZATIONS = ("gated", "valid")


def _setting(default: Any, config: str, help: str, **argparse: Any) -> Any:
    """A field read from the config field ``config``; ``help`` and ``argparse`` keywords become that field's."""
    return field(default=default, metadata={"config": config, "help": help, **argparse})


@dataclass(frozen=True)
class MRPSettings:
    """loss = ce_weight * CE + lam * objective (docs/spec.md): the objective, its weight lam, the margin threshold
    tau, the top-k objectives' k, positions per float32 logits chunk, how a gated objective is averaged, the CE's
    label smoothing, the precision of the head matmuls and the CE's weight. Checked on construction
    (MRPUserError)."""

    objective: str = _setting("fisher", "mrp_objective", objectives_help())
    lam: float = _setting(0.6, "mrp_lambda", "Weight of the objective (>= 0; 0 gives plain CE).")
    tau: float = _setting(
        1.0, "mrp_margin_threshold", "tau: the gated objectives act on positions with margin below tau (> 0)."
    )
    top_k: int = _setting(
        5, "mrp_top_k", "k: top logits the top-k objectives read (fisher, proxy, ...; 2 <= k <= vocab)."
    )
    chunk_size: int = _setting(
        1024, "mrp_chunk_size", "Positions per float32 [chunk x vocab] logits chunk (memory vs. speed)."
    )
    normalization: str = _setting(
        "gated",
        "mrp_margin_normalization",
        "How a gated objective (margin, correct_margin, proxy_gated, ...) is averaged: 'gated' divides it by the "
        "positions its gate admits (the paper's mean over gated positions, per micro-batch), 'valid' by all valid "
        "positions like CE (exact under gradient accumulation). Other objectives: always 'valid'.",
    )
    label_smoothing: float = _setting(0.0, "label_smoothing_factor", "TrainingArguments' own field.")
    precision: str = _setting(
        "float32",
        "mrp_logits_precision",
        "Precision of the fused loss' head matmuls: 'float32' (default: float32 logits and gradients whatever "
        "bf16 / fp16 autocast or the model's dtype) or 'bfloat16' (opt-in, speed over the float32 guarantee: h, W "
        "and the logits' gradient rounded to bfloat16 operands, products and sums in float32, float32 logits; "
        "tensor cores on CUDA). The audit is always float32.",
        choices=list(LOGITS_PRECISIONS),
    )
    ce_weight: float = _setting(
        1.0,
        "mrp_ce_weight",
        "Weight of the cross-entropy (>= 0; 0 trains the objective alone, as the released --ce-weight 0). "
        "loss_ce logs the unweighted CE.",
    )

    def __post_init__(self) -> None:
        for item in fields(self):
            value, name = getattr(self, item.name), item.metadata["config"]
            if item.type in ("float", "int"):
                require_number(name, value, integer=item.type == "int")
                object.__setattr__(self, item.name, (float if item.type == "float" else int)(value))  # numpy scalars
        self._check_choices()
        self._check_ranges()

    @property
    def record(self) -> Objective:
        """The registered objective (looked up when used: a user may register it after these settings exist)."""
        return objective(self.objective)

    @property
    def k(self) -> int:
        """The number of top logits the objective reads (its own, or mrp_top_k)."""
        return self.record.k(self.top_k)

    @classmethod
    def from_config(cls, config: Any) -> MRPSettings:
        """The settings of a config holding every field's ``metadata["config"]`` attribute (checked)."""
        return cls(**{item.name: getattr(config, item.metadata["config"]) for item in fields(cls)})

    def _check_choices(self) -> None:
        objective(self.objective)  # one line naming the registered objectives
        if self.normalization not in NORMALIZATIONS:
            raise MRPUserError(
                f"unknown mrp_margin_normalization {self.normalization!r}; choose one of {', '.join(NORMALIZATIONS)}"
            )
        if self.precision not in LOGITS_PRECISIONS:
            raise MRPUserError(
                f"unknown mrp_logits_precision {self.precision!r}; choose one of "
                f"{', '.join(LOGITS_PRECISIONS)} (float32 is the default and the exact one)"
            )

    def _check_ranges(self) -> None:
        if not self.lam >= 0:
            raise MRPUserError(f"mrp_lambda must be >= 0 (0 gives plain cross-entropy), got {self.lam}")
        if not self.ce_weight >= 0:
            raise MRPUserError(f"mrp_ce_weight must be >= 0 (0 trains the objective alone), got {self.ce_weight}")
        if not self.tau > 0:
            raise MRPUserError(f"mrp_margin_threshold (tau) must be > 0, got {self.tau}")
        if self.top_k < 2:
            raise MRPUserError(f"mrp_top_k must be at least 2 (a margin needs two tokens), got {self.top_k}")
        if self.chunk_size < 1:
            raise MRPUserError(f"mrp_chunk_size must be positive, got {self.chunk_size}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise MRPUserError(
                f"label_smoothing_factor must be in [0, 1] (0: no smoothing), got {self.label_smoothing}"
            )


CONFIG_FIELDS = tuple(item.metadata["config"] for item in fields(MRPSettings))  # the config fields it is built from
