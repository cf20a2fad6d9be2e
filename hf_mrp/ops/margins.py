"""Per-position decision statistics, reduced over the vocabulary one chunk of positions at a time.

A chunk of logits is [chunk x vocab] float32; the whole [positions x vocab] matrix never exists.
"""

from __future__ import annotations

import torch

from .objectives import fisher_penalty, margin_penalty


def output_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """z = h W^T (+ b) in the dtype of ``weight`` (callers cast once, outside their chunk loop)."""
    logits = hidden.to(weight.dtype) @ weight.T
    if bias is not None:
        logits = logits + bias.to(weight.dtype)
    return logits


def _chunk_statistics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight32: torch.Tensor,
    top_k: int,
    tau: float,
) -> dict[str, torch.Tensor]:
    """Statistics of one chunk. ``logits`` may be low precision: only the margin keeps that dtype."""
    top_values, top_ids = logits.topk(top_k, dim=-1)
    margin = (top_values[:, 0] - top_values[:, 1]).float()
    z = logits.float()
    top32 = top_values.float()
    log_norm = torch.logsumexp(z, dim=-1)
    probs = torch.softmax(z, dim=-1)
    entropy = log_norm - (probs * z).sum(-1)
    target_logit = z.gather(1, targets[:, None]).squeeze(1)
    target_prob = probs.gather(1, targets[:, None]).squeeze(1)
    # signed target margin: z_y - max_{j != y} z_j (positive iff the target is the top-1 token)
    is_top1 = top_ids[:, 0] == targets
    best_other = torch.where(is_top1, top32[:, 1], top32[:, 0])
    w1, w2 = weight32[top_ids[:, 0]], weight32[top_ids[:, 1]]
    return {
        "top1_id": top_ids[:, 0],
        "top2_id": top_ids[:, 1],
        "margin": margin,
        "correct": is_top1,
        "entropy": entropy,
        "p_top1": torch.exp(top32[:, 0] - log_norm),
        "target_logprob": target_logit - log_norm,
        "target_margin": target_logit - best_other,
        "geometric_margin": margin / (w1 - w2).norm(dim=-1).clamp_min(1e-12),
        "brier": 1.0 - 2.0 * target_prob + probs.pow(2).sum(-1),
        "fisher_penalty": fisher_penalty(top32, weight32[top_ids]),
        "margin_penalty": margin_penalty(top32, tau),
    }


@torch.no_grad()
def decision_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int = 1024,
    logits_dtype: torch.dtype = torch.float32,
    top_k: int = 5,
    tau: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Every per-position statistic of the spec for ``hidden`` [N, d] predicting ``targets`` [N].

    Logits are recomputed from hidden states as ``h.float() @ W.float().T`` (spec: float32 logits),
    ``chunk_size`` positions at a time. ``logits_dtype`` other than float32 reproduces the low
    precision margin artifact (only ``margin`` is affected). Also returns the per-position MRP
    penalties (Fisher with ``top_k`` tokens, margin with threshold ``tau``) used by the logit lens.
    """
    if hidden.dim() != 2 or targets.dim() != 1 or hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"expected hidden [N, d] and targets [N], got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    weight32 = weight.float()
    bias32 = None if bias is None else bias.float()
    low_weight = weight.to(logits_dtype)
    low_bias = None if bias is None else bias.to(logits_dtype)
    chunks = []
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        y = targets[start : start + chunk_size]
        if logits_dtype == torch.float32:
            logits = output_logits(h.float(), weight32, bias32)
        else:
            logits = output_logits(h.to(logits_dtype), low_weight, low_bias)
        chunks.append(_chunk_statistics(logits, y, weight32, top_k, tau))
    if not chunks:
        return {}
    return {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}
