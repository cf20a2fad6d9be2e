"""Per-position decision statistics, reduced over the vocabulary one chunk of positions at a time.

A chunk of logits is [chunk x vocab] float32 (whatever autocast or the model's dtype: `precision.py`); the whole
[positions x vocab] matrix never exists.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .objectives import TopK, penalty_column
from .precision import HeadOperands, autocast_off
from .transform import IDENTITY, LogitTransform


def output_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """z = h W^T (+ b) in the dtype of ``weight``, as the caller's autocast state computes it."""
    logits = hidden.to(weight.dtype) @ weight.T
    if bias is not None:
        logits = logits + bias.to(weight.dtype)
    return logits


class ChunkSoftmax(NamedTuple):
    """The log-sum-exp pieces of one chunk of float32 logits z: ``shifted`` = z - max (the logits buffer
    itself), ``exp`` = exp(z - max), ``total`` = S = sum exp(z - max); the log-normalizer is max + log S."""

    top_values: torch.Tensor
    top_ids: torch.Tensor
    target_logit: torch.Tensor
    peak: torch.Tensor
    shifted: torch.Tensor
    exp: torch.Tensor
    total: torch.Tensor
    log_total: torch.Tensor

    def entropy(self, in_place: bool = False) -> torch.Tensor:
        """H = log S - sum e (z - max) / S; ``in_place`` reuses the shifted buffer (it is gone afterwards), else
        the row sums are batched dot products (no [chunk x V] product is formed)."""
        if in_place:
            weighted = self.shifted.mul_(self.exp).sum(-1)
        else:
            weighted = torch.bmm(self.exp[:, None, :], self.shifted[:, :, None]).view(-1)
        return self.log_total - weighted / self.total


def chunk_softmax(
    logits: torch.Tensor,
    targets: torch.Tensor,
    top_k: int,
    exp_out: torch.Tensor | None = None,
    keep_shifted: bool = True,
) -> ChunkSoftmax:
    """Top-k, target logit and log-sum-exp of one chunk, in place: ``logits`` becomes z - max. The
    exponentials go to ``exp_out`` when given, else to a new tensor, or over ``logits`` itself when
    ``keep_shifted`` is False (one [chunk x V] buffer: the caller needs no z - max afterwards)."""
    top_values, top_ids = logits.topk(top_k, dim=-1)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    peak = top_values[:, :1]
    shifted = logits.sub_(peak)
    if exp_out is not None:
        exp = torch.exp(shifted, out=exp_out)
    else:
        exp = shifted.exp() if keep_shifted else shifted.exp_()
    total = exp.sum(-1)
    return ChunkSoftmax(top_values, top_ids, target_logit, peak, shifted, exp, total, total.log())


def _chunk_statistics(
    logits: torch.Tensor,
    exp_buffer: torch.Tensor,
    targets: torch.Tensor,
    head: HeadOperands,
    top_k: int,
    tau: float,
    raw_top2: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Statistics of one chunk of float32 logits, computed in place: ``logits`` and ``exp_buffer``
    are overwritten (each pass over [chunk x V] reuses them rather than allocating). ``raw_top2`` are the
    top-2 logits before a soft cap (the geometric margin is a distance in hidden space: uncapped)."""
    parts = chunk_softmax(logits, targets, top_k, exp_out=exp_buffer)
    top_values, top_ids, target_logit, peak, _, exp, total, log_total = parts
    log_norm = peak.squeeze(1) + log_total
    target_prob = torch.exp(target_logit - log_norm)
    margin = top_values[:, 0] - top_values[:, 1]
    # signed target margin: z_y - max_{j != y} z_j (positive iff the target is the top-1 token)
    is_top1 = top_ids[:, 0] == targets
    best_other = torch.where(is_top1, top_values[:, 1], top_values[:, 0])
    top_rows = head.rows(top_ids)
    w1, w2 = top_rows[:, 0], top_rows[:, 1]
    raw_margin = margin if raw_top2 is None else raw_top2[:, 0] - raw_top2[:, 1]
    entropy = parts.entropy(in_place=True)
    brier = 1.0 - 2.0 * target_prob + exp.square_().sum(-1) / total.square()  # 1 - 2 p_y + sum p^2
    return {
        "top1_id": top_ids[:, 0],
        "top2_id": top_ids[:, 1],
        "margin": margin,
        "correct": is_top1,
        "entropy": entropy,
        "p_top1": 1.0 / total,  # exp(z_(1) - max) = 1
        "target_logprob": target_logit - log_norm,
        "target_margin": target_logit - best_other,
        "geometric_margin": raw_margin / (w1 - w2).norm(dim=-1).clamp_min(1e-12),
        "brier": brier,
        **penalty_columns(TopK(top_values, top_ids, targets, target_logit, is_top1, tau, rows=top_rows)),
    }


def penalty_columns(top: TopK) -> dict[str, torch.Tensor]:
    """The audit's per-position MRP penalties, each its registered objective's (0 outside the objective's gate)."""
    return {"fisher_penalty": penalty_column("fisher", top), "margin_penalty": penalty_column("margin", top)}


@torch.no_grad()
def decision_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int = 1024,
    margin_dtype: torch.dtype = torch.float32,
    top_k: int = 5,
    tau: float = 1.0,
    transform: LogitTransform = IDENTITY,
) -> dict[str, torch.Tensor]:
    """Every per-position statistic of the spec for ``hidden`` [N, d] predicting ``targets`` [N].

    Logits are recomputed from hidden states as ``h.float() @ W.float().T`` (spec: float32 logits, also under
    autocast and for a bf16 / fp16 model), ``chunk_size`` positions at a time, into two reused [chunk x V]
    buffers. ``margin_dtype`` other than float32 recomputes the margin alone in that dtype, to show the
    low-precision artifact. Also returns the per-position MRP penalties (Fisher over ``top_k`` tokens, margin
    with threshold ``tau``) used by the logit lens. ``transform`` is the model's own scaling / soft cap.
    """
    if hidden.dim() != 2 or targets.dim() != 1 or hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected hidden [N, d] and targets [N], got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    with autocast_off(hidden, weight):
        return _decision_statistics(
            hidden, HeadOperands(weight, bias, transform), targets, chunk_size, margin_dtype, top_k, tau, transform
        )


def _decision_statistics(
    hidden: torch.Tensor,
    head: HeadOperands,
    targets: torch.Tensor,
    chunk_size: int,
    margin_dtype: torch.dtype,
    top_k: int,
    tau: float,
    transform: LogitTransform,
) -> dict[str, torch.Tensor]:
    rows = min(chunk_size, hidden.shape[0])
    low_weight, low_bias = head.low_precision_weight(margin_dtype) if margin_dtype != torch.float32 else (None, None)
    logits_buffer = hidden.new_empty((rows, head.vocab), dtype=torch.float32)
    exp_buffer = torch.empty_like(logits_buffer)
    chunks = []
    for start in range(0, max(hidden.shape[0], 1), chunk_size):  # no position: one empty chunk, typed columns
        h = hidden[start : start + chunk_size]
        n = h.shape[0]
        logits = head.logits(h, out=logits_buffer[:n])
        raw_top2 = logits.topk(2, dim=-1).values if transform.softcap is not None else None
        stats = _chunk_statistics(
            transform.cap_(logits), exp_buffer[:n], targets[start : start + chunk_size], head, top_k, tau, raw_top2
        )
        if low_weight is not None:
            low = transform.cap_(output_logits(h.to(margin_dtype), low_weight, low_bias))
            top = low.topk(2, dim=-1).values
            stats["margin"] = (top[:, 0] - top[:, 1]).float()
        chunks.append(stats)
    return {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}
