"""Numpy-only statistics of audits: the flip arithmetic (flips.py), token classes and frequency buckets
(token_classes.py), calibration (calibration.py), percentile intervals (intervals.py), the block bootstrap,
paired differences and seed intervals (resampling.py).

No torch, transformers or peft imports: these run on per-position tables already on disk. `hf-mrp compare`,
the sweep and MRPAuditCallback (through compare) take every flip number from here; hf_mrp.ops keeps the torch math.
"""

from .flips import (
    FlipNumbers,
    finite_or_none,
    flip_numbers,
    flip_sign,
    none_to_nan,
    ratio,
    relative_median_margin_change,
)
from .resampling import (
    BlockIndex,
    block_bootstrap_distribution,
    block_resamples,
    paired_interval,
    seed_t_interval,
)

__all__ = [
    "BlockIndex",
    "block_bootstrap_distribution",
    "block_resamples",
    "paired_interval",
    "seed_t_interval",
    "FlipNumbers",
    "flip_numbers",
    "flip_sign",
    "relative_median_margin_change",
    "ratio",
    "finite_or_none",
    "none_to_nan",
]
