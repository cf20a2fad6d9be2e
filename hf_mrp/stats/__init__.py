"""Numpy-only statistics of audits: the flip arithmetic (flips.py), token classes and frequency buckets
(token_classes.py), calibration (calibration.py), position and block bootstrap intervals, paired differences
and seed intervals (intervals.py, resampling.py).

No torch, transformers or peft imports: these run on per-position tables already on disk. `hf-mrp compare`,
the sweep and MRPAuditCallback (through compare) take every flip number from here; hf_mrp.ops keeps the torch math.
"""

from .flips import finite_or_none, flip_numbers, flip_sign, median_margin_change, none_to_nan, ratio
from .resampling import (
    BlockIndex,
    block_bootstrap_ci,
    block_bootstrap_distribution,
    block_resamples,
    paired_interval,
    seed_t_interval,
)

__all__ = ["BlockIndex", "block_bootstrap_ci", "block_bootstrap_distribution", "block_resamples",
           "paired_interval", "seed_t_interval", "flip_numbers", "flip_sign", "median_margin_change", "ratio",
           "finite_or_none", "none_to_nan"]
