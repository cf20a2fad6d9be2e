"""Pure torch and numpy math: no transformers, peft or accelerate imports here, so each piece can be tested
against a naive reference and benchmarked in isolation.

The per-position math of the audits and the trainers: decision statistics over the vocabulary in chunks
(margins.py), the fused CE + MRP objective loss and its settings (fused.py: the chunk loop and autograd glue,
chunk_loss.py: one chunk's math, head_gradients.py: h / W / b gradients, settings.py), the registry of
objectives (objectives/), float32 head
operands (precision.py), the model's logit transform (transform.py), the gap law (gap.py), the layer-wise
lens (lens.py) and the objective's per-position target weights (targeting.py). The numbers computed from
per-position tables already on disk (flips, intervals, calibration) are hf_mrp.stats'.
"""

from .fused import IGNORE_INDEX, MRPLossSums, mrp_loss_sums
from .gap import GapFit, fit_gap_law
from .margins import decision_statistics, output_logits
from .objectives import TopK, fisher_penalty, margin_penalty, objective, objective_names, register_objective
from .precision import LOGITS_PRECISIONS, HeadOperands, autocast_off
from .settings import MRPSettings

__all__ = [
    "decision_statistics",
    "output_logits",
    "TopK",
    "objective",
    "objective_names",
    "register_objective",
    "fisher_penalty",
    "margin_penalty",
    "IGNORE_INDEX",
    "MRPSettings",
    "MRPLossSums",
    "mrp_loss_sums",
    "LOGITS_PRECISIONS",
    "HeadOperands",
    "autocast_off",
    "GapFit",
    "fit_gap_law",
]
