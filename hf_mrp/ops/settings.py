"""The MRP loss' settings: one frozen, checked object from the config to the fused autograd Function.

`MRPConfig` and `MRPSFTConfig` build it once from their ``mrp_*`` fields (and TrainingArguments'
``label_smoothing_factor``); the loss and `mrp_loss_sums` take it whole. Its fields are those config fields
without the prefix, and its refusals name the config fields, so a bad setting reads the same from every door.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MRPUserError, require_number
from .objectives import OBJECTIVES
from .precision import LOGITS_PRECISIONS

NORMALIZATIONS = ("gated", "valid")


@dataclass(frozen=True)
class MRPSettings:
    """loss = CE + lam * objective (docs/spec.md): the objective, its weight lam, the margin threshold tau, the
    Fisher objective's k, positions per float32 logits chunk, how the margin objective is averaged, the CE's
    label smoothing and the precision of the head matmuls. Checked on construction (MRPUserError)."""

    objective: str = "fisher"  # mrp_objective
    lam: float = 0.6  # mrp_lambda
    tau: float = 1.0  # mrp_margin_threshold
    top_k: int = 5  # mrp_top_k
    chunk_size: int = 1024  # mrp_chunk_size
    normalization: str = "gated"  # mrp_margin_normalization
    label_smoothing: float = 0.0  # label_smoothing_factor
    precision: str = "float32"  # mrp_logits_precision

    def __post_init__(self) -> None:
        for name, value in (
            ("mrp_lambda", self.lam),
            ("mrp_margin_threshold", self.tau),
            ("label_smoothing_factor", self.label_smoothing),
        ):
            require_number(name, value)
        for name, value in (("mrp_top_k", self.top_k), ("mrp_chunk_size", self.chunk_size)):
            require_number(name, value, integer=True)
        self._check_choices()
        self._check_ranges()
        for name, kind in (
            ("lam", float),
            ("tau", float),
            ("label_smoothing", float),
            ("top_k", int),
            ("chunk_size", int),
        ):  # numpy scalars and ints for floats: plain Python numbers
            object.__setattr__(self, name, kind(getattr(self, name)))

    def _check_choices(self) -> None:
        if self.objective not in OBJECTIVES:
            raise MRPUserError(f"unknown mrp_objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
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
