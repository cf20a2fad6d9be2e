"""Pure tensor and numpy math: no transformers, peft or accelerate imports here.

Everything the audits and the trainer compute per position lives in this package, so it can be
tested against naive references and benchmarked in isolation.
"""

from .fused import FusedSettings, MRPLossSums, mrp_loss_sums
from .gap import GapFit, fit_gap_law
from .margins import decision_statistics, output_logits
from .objectives import OBJECTIVES, entropy_penalty, fisher_penalty, margin_penalty
from .precision import LOGITS_PRECISIONS, HeadOperands, autocast_off

__all__ = [
    "decision_statistics",
    "output_logits",
    "OBJECTIVES",
    "entropy_penalty",
    "fisher_penalty",
    "margin_penalty",
    "FusedSettings",
    "MRPLossSums",
    "mrp_loss_sums",
    "LOGITS_PRECISIONS",
    "HeadOperands",
    "autocast_off",
    "GapFit",
    "fit_gap_law",
]
