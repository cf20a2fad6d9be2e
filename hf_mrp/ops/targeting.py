"""Targeted refinement: per-position weights of the MRP objective from the class or frequency of the target.

The paper's corrections fall on frequent structural tokens; targeting asks whether the objective can be
aimed elsewhere (content and entity-like tokens). A position is targeted when its target token is in one
of the chosen classes AND in one of the chosen frequency buckets (an empty choice does not restrict);
targeted positions weigh 1 in the objective, the others ``untargeted_weight`` (default 0: the objective
ignores them). Cross-entropy is never weighted. The weights travel as MRPTrainer's per-token
``mrp_weights`` column, aligned with ``labels``: the weight at index j belongs to the token input_ids[j].

Frequency buckets count each token among all tokens of the training blocks (the audit counts among the
audited blocks: same rule, the data the numbers are about). Pure numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..stats.token_classes import BUCKETS, CLASSES, frequency_bucket, target_class_codes


def check_targets(classes: Sequence[str] | None, buckets: Sequence[str] | None) -> None:
    """Refuse unknown class or bucket names, naming the valid ones (ValueError; callers re-raise as user errors)."""
    for kind, chosen, valid in (("class", classes, CLASSES), ("bucket", buckets, BUCKETS)):
        unknown = [name for name in chosen or () if name not in valid]
        if unknown:
            raise ValueError(f"unknown token {kind} {', '.join(map(repr, unknown))}; choose from {', '.join(valid)}")


def targeted_tokens(
    ids: np.ndarray, decode: Callable[[int], str], classes: Sequence[str] | None, buckets: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(distinct token ids of ``ids``, whether each is targeted): class of the decoded token, bucket of its
    count in ``ids``."""
    check_targets(classes, buckets)
    tokens, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
    keep = np.ones(tokens.size, dtype=bool)
    if classes:
        keep &= np.isin(np.asarray(CLASSES, dtype=object)[target_class_codes(tokens, decode)], list(classes))
    if buckets:
        keep &= np.isin(frequency_bucket(counts), list(buckets))
    return tokens, keep


def objective_weights(
    ids: np.ndarray,
    decode: Callable[[int], str],
    classes: Sequence[str] | None = None,
    buckets: Sequence[str] | None = None,
    untargeted_weight: float = 0.0,
) -> np.ndarray:
    """float32 weights shaped like ``ids`` (the training blocks): 1 where the token is targeted, else
    ``untargeted_weight``. With neither classes nor buckets every weight is 1 (no targeting)."""
    if not 0.0 <= untargeted_weight <= 1.0:
        raise ValueError(f"the untargeted weight must be in [0, 1], got {untargeted_weight}")
    ids = np.asarray(ids, dtype=np.int64)
    tokens, keep = targeted_tokens(ids, decode, classes, buckets)
    per_token = np.where(keep, 1.0, untargeted_weight).astype(np.float32)
    return per_token[np.searchsorted(tokens, ids)]


WEIGHTINGS = ("none", "inverse_frequency")


def inverse_frequency_weights(ids: np.ndarray) -> np.ndarray:
    """float32 weights shaped like ``ids`` (the training blocks): proportional to 1 / the token's count among all
    tokens of the blocks, scaled to mean 1 over the positions that are targets (every token but each block's
    first), so lambda keeps its scale. The paper's open direction (frequency-aware weighting): rare targets weigh
    more, the frequent structural tokens that take most corrections less."""
    ids = np.asarray(ids, dtype=np.int64)
    tokens, counts = np.unique(ids, return_counts=True)
    weights = (1.0 / counts.astype(np.float64))[np.searchsorted(tokens, ids)]
    targets = weights[:, 1:] if weights.ndim == 2 else weights[1:]
    return (weights / targets.mean()).astype(np.float32)
