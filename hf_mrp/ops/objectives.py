"""The MRP objectives as per-position penalties (spec, section Refinement objectives).

Each function maps one position's logits (or its top-k logits) to a penalty P_t; the loss adds
lambda * sum_t P_t / n_valid to cross-entropy (the entropy objective is computed in the fused
loss itself, fused.py, from the logits buffer it already holds). Inputs are float32; all of it is differentiable
in the logit values (top-k indices carry no gradient) and, for Fisher, in the k rows of W.
"""

from __future__ import annotations

import torch

OBJECTIVES = ("margin", "fisher", "entropy")


def margin_penalty(top_values: torch.Tensor, tau: float) -> torch.Tensor:
    """-m_t for positions whose margin m_t = z_(1) - z_(2) is below ``tau``, else 0. [N, >=2] -> [N]."""
    margin = top_values[:, 0] - top_values[:, 1]
    return torch.where(margin < tau, -margin, torch.zeros_like(margin))


def fisher_penalty(top_values: torch.Tensor, top_rows: torch.Tensor) -> torch.Tensor:
    """P_t = sum_{i != j} p_i p_j d_ij over the top-k tokens. [N, k], [N, k, d] -> [N].

    p = softmax of the k logits, w~ the unit-normalized rows of W, u_ij[m] = (w~_i - w~_j) . w~_m,
    d_ij^2 = u_ij^T (diag(p) - p p^T) u_ij, d_ij = sqrt(max(d_ij^2, 1e-8)).
    """
    probs = torch.softmax(top_values, dim=-1)  # [N, k]
    unit = top_rows / top_rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    gram = unit @ unit.transpose(1, 2)  # [N, k, k]: gram[i, m] = w~_i . w~_m
    u = gram[:, :, None, :] - gram[:, None, :, :]  # [N, k, k, k]: u[i, j, m]
    p_m = probs[:, None, None, :]
    mean_u = (u * p_m).sum(-1)
    d2 = (u.pow(2) * p_m).sum(-1) - mean_u.pow(2)  # u^T diag(p) u - (p^T u)^2
    distance = d2.clamp_min(1e-8).sqrt()
    k = probs.shape[1]
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=probs.device)
    pair_weight = probs[:, :, None] * probs[:, None, :] * off_diagonal
    return (pair_weight * distance).sum(dim=(1, 2))
