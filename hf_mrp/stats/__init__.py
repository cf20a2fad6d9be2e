"""Numpy-only statistics of audits: block (cluster) bootstrap, paired differences, seed intervals.

No torch, transformers or peft imports: these run on per-position tables already on disk.
"""

from .resampling import (
    BlockIndex, block_bootstrap_ci, block_bootstrap_distribution, block_resamples, paired_interval,
    seed_t_interval,
)

__all__ = ["BlockIndex", "block_bootstrap_ci", "block_bootstrap_distribution", "block_resamples",
           "paired_interval", "seed_t_interval"]
