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
DEPTH_LENSES = ("raw", "logit", "tuned")


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
    depth_objective: str = _setting(
        "proxy",
        "mrp_depth_objective",
        "The top-k objective 'depth' and 'combined' apply at each layer of mrp_target_layers (default 'proxy', as "
        "released; any registered top-k objective).",
    )
    target_layers: str = _setting(
        "23,25,27",
        "mrp_target_layers",
        "The layers whose logits 'depth' and 'combined' read: 0-based decoder blocks as the audit numbers them, "
        "'12,14,16' or '12-16', the final layer excluded (default 23,25,27: the released hidden_states[24,26,28]).",
    )
    depth_lens: str = _setting(
        "raw",
        "mrp_depth_lens",
        "How 'depth' and 'combined' turn a target layer's states into logits: 'raw' (h_l W^T, as released), 'logit' "
        "(the final norm first: the logit lens) or 'tuned' (the tuned lens of mrp_depth_lens_path).",
        choices=list(DEPTH_LENSES),
    )
    depth_lens_path: str | None = _setting(
        None,
        "mrp_depth_lens_path",
        "The tuned lens mrp_depth_lens='tuned' reads: a folder written by `hf-mrp lens train --output_dir`.",
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

    @property
    def depth_record(self) -> Objective:
        """The objective a ``layers`` record applies at the target layers (``mrp_depth_objective``)."""
        return objective(self.depth_objective, "mrp_depth_objective")

    @property
    def layer_indices(self) -> tuple[int, ...]:
        """The target layers, sorted (``mrp_target_layers``; checked against the model where it is known)."""
        items: set[int] = set()
        for part in filter(None, (p.strip() for p in str(self.target_layers).split(","))):
            low, dash, high = part.partition("-")
            if not low.isdigit() or not (high or low).isdigit() or (dash and not high):
                raise MRPUserError(
                    f"mrp_target_layers {self.target_layers!r} is not a list of layers; write them like '12,14,16' "
                    "or '12-16' (0-based decoder blocks)"
                )
            items.update(range(int(low), int(high or low) + 1))
        if not items:
            raise MRPUserError("mrp_target_layers names no layer; write them like '12,14,16' (0-based blocks)")
        return tuple(sorted(items))

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
        if self.depth_lens not in DEPTH_LENSES:
            raise MRPUserError(f"unknown mrp_depth_lens {self.depth_lens!r}; choose one of {', '.join(DEPTH_LENSES)}")
        self._check_depth()
        if self.precision not in LOGITS_PRECISIONS:
            raise MRPUserError(
                f"unknown mrp_logits_precision {self.precision!r}; choose one of "
                f"{', '.join(LOGITS_PRECISIONS)} (float32 is the default and the exact one)"
            )

    def _check_depth(self) -> None:
        """The settings of a ``layers`` objective (checked whatever the objective, so that a bad one never waits for
        the objective that reads it): a top-k depth objective, the layers' syntax, a tuned lens' path."""
        depth = self.depth_record
        if depth.penalty is None or depth.layers or depth.full_logits or depth.closed_form is not None:
            raise MRPUserError(
                f"mrp_depth_objective {self.depth_objective!r} does not read top-k logits; choose a top-k objective "
                "such as proxy (the released default), fisher, margin, correct_margin or proxy_gated"
            )
        _ = self.layer_indices  # its syntax, refused in one line
        if self.depth_lens_path is not None and not isinstance(self.depth_lens_path, str):
            raise MRPUserError(
                f"mrp_depth_lens_path must be the path of a tuned lens folder, got {self.depth_lens_path!r}"
            )
        if self.depth_lens == "tuned" and not self.depth_lens_path:
            raise MRPUserError(
                "mrp_depth_lens 'tuned' needs mrp_depth_lens_path: the folder of a lens written by "
                "`hf-mrp lens train --output_dir` (or use mrp_depth_lens 'logit')"
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
