"""The built-in objectives (spec, section Refinement objectives), registered as records like a user's.

Each penalty maps one chunk's `TopK` to P_t per position: the paper's margin, Fisher and entropy objectives, and
the released code's variants (github.com/mellowmarshall/mrp-paper, src/mrp/training.py): ``correct_margin``,
``proxy`` (the released ``final``), ``proxy_gated`` (the released ``margin_gated``), ``depth`` (``mrp_depth_objective``,
the proxy by default, on the logits of ``mrp_target_layers``, averaged over them) and ``combined`` (depth +
proxy_gated). Inputs are float32; all of
it is differentiable in the logit values (top-k indices carry no gradient) and in the k rows of W.
"""

from __future__ import annotations

from typing import Any

import torch

from .registry import Objective, TopK, register_builtin

FISHER_LIVE_COPIES = 4  # [chunk x k x k x k] float32 tensors alive at once in fisher_penalty


def margin_penalty(top_values: torch.Tensor, tau: float) -> torch.Tensor:
    """-m_t for positions whose margin m_t = z_(1) - z_(2) is below ``tau``, else 0. [N, >=2] -> [N]."""
    margin = top_values[:, 0] - top_values[:, 1]
    return torch.where(margin < tau, -margin, torch.zeros_like(margin))


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _off_diagonal_pairs(probs: torch.Tensor) -> torch.Tensor:
    """p_i p_j for i != j, [N, k, k]."""
    k = probs.shape[1]
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=probs.device)
    return probs[:, :, None] * probs[:, None, :] * off_diagonal


def fisher_penalty(top_values: torch.Tensor, top_rows: torch.Tensor) -> torch.Tensor:
    """P_t = sum_{i != j} p_i p_j d_ij over the top-k tokens. [N, k], [N, k, d] -> [N].

    p = softmax of the k logits, w~ the unit-normalized rows of W, u_ij[m] = (w~_i - w~_j) . w~_m,
    d_ij^2 = u_ij^T (diag(p) - p p^T) u_ij, d_ij = sqrt(max(d_ij^2, 1e-8)).
    """
    probs = torch.softmax(top_values, dim=-1)  # [N, k]
    unit = _unit(top_rows)
    gram = unit @ unit.transpose(1, 2)  # [N, k, k]: gram[i, m] = w~_i . w~_m
    u = gram[:, :, None, :] - gram[:, None, :, :]  # [N, k, k, k]: u[i, j, m]
    p_m = probs[:, None, None, :]
    mean_u = (u * p_m).sum(-1)
    d2 = (u.pow(2) * p_m).sum(-1) - mean_u.pow(2)  # u^T diag(p) u - (p^T u)^2
    return (_off_diagonal_pairs(probs) * d2.clamp_min(1e-8).sqrt()).sum(dim=(1, 2))


def proxy_penalty(top_values: torch.Tensor, top_rows: torch.Tensor) -> torch.Tensor:
    """The released ``final`` penalty: P_t = sum_{i != j} p_i p_j (1 - cos(w_i, w_j)) over the top-k tokens, p the
    softmax of the k logits. [N, k], [N, k, d] -> [N]."""
    unit = _unit(top_rows)
    distance = 1.0 - unit @ unit.transpose(1, 2)  # [N, k, k]
    return (_off_diagonal_pairs(torch.softmax(top_values, dim=-1)) * distance).sum(dim=(1, 2))


def _margin(top: TopK) -> torch.Tensor:
    return top.values[:, 0] - top.values[:, 1]


def _margin_objective(top: TopK) -> tuple[torch.Tensor, torch.Tensor]:
    margin = _margin(top)
    return -margin, margin < top.tau


def _correct_margin_objective(top: TopK) -> tuple[torch.Tensor, torch.Tensor]:
    margin = _margin(top)
    return -margin, top.correct & (margin < top.tau)


def _fisher_objective(top: TopK) -> torch.Tensor:
    assert top.rows is not None  # registered with rows=True
    return fisher_penalty(top.values, top.rows)


def _proxy_objective(top: TopK) -> torch.Tensor:
    assert top.rows is not None  # registered with rows=True
    return proxy_penalty(top.values, top.rows)


def _proxy_gated_objective(top: TopK) -> tuple[torch.Tensor, torch.Tensor]:
    return _proxy_objective(top), _margin(top) < top.tau


def _entropy_objective(top: TopK) -> torch.Tensor:
    assert top.logits is not None  # registered with full_logits=True
    return -(torch.softmax(top.logits, -1) * torch.log_softmax(top.logits, -1)).sum(-1)


class EntropyInBuffer:
    """The entropy objective in the fused loss' logits buffer: H = log S - sum e (z - max) / S and
    dH/dz = -p (log p + H), log p = (z - max) - log S. With p = e / S, c p + s dH/dz is
    e x ((c + s (log S - H)) / S - (s / S)(z - max)): one fused pass writes that factor over the shifted logits,
    one more multiplies it into the exponentials (no autograd, no separate softmax pass)."""

    def values(self, parts: Any) -> torch.Tensor:
        return parts.entropy()

    def gradient_(
        self, exp: torch.Tensor, parts: Any, values: torch.Tensor, scale: Any, ce_weight: float, inv_total: Any
    ) -> torch.Tensor:
        bias = inv_total * (ce_weight + scale * (parts.log_total - values)[:, None])
        factor = torch.addcmul(bias, parts.shifted, inv_total * scale, value=-1.0, out=parts.shifted)
        return exp.mul_(factor)


BUILTINS = (
    Objective(
        "margin",
        _margin_objective,
        top_k=2,
        gated=True,
        description="-m where the margin m (top-1 minus top-2 logit) is below tau: widens small margins",
    ),
    Objective(
        "fisher",
        _fisher_objective,
        rows=True,
        description="the Fisher distance between the top-k tokens, weighted by p_i p_j",
        memory=lambda k: FISHER_LIVE_COPIES * 4 * k**3,
    ),
    Objective(
        "entropy",
        _entropy_objective,
        top_k=2,
        full_logits=True,
        description="the full-vocabulary entropy H (a geometry-free baseline)",
        closed_form=EntropyInBuffer(),
    ),
    Objective(
        "correct_margin",
        _correct_margin_objective,
        top_k=2,
        gated=True,
        description="-m where the top-1 token is the target and m is below tau",
    ),
    Objective(
        "proxy",
        _proxy_objective,
        rows=True,
        description="the released 'final': the cosine distance 1 - cos(w_i, w_j) between the top-k tokens, "
        "weighted by p_i p_j",
    ),
    Objective(
        "proxy_gated",
        _proxy_gated_objective,
        rows=True,
        gated=True,
        description="the released 'margin_gated': the proxy where m is below tau",
    ),
    Objective(
        "depth",
        None,
        layers=True,
        description="the released 'depth': mrp_depth_objective (default proxy) on the logits of the layers "
        "mrp_target_layers (projected by mrp_depth_lens), averaged over them",
    ),
    Objective(
        "combined",
        _proxy_gated_objective,
        rows=True,
        gated=True,
        layers=True,
        description="the released 'combined': depth + proxy_gated (logged as loss_mrp_depth, loss_mrp_final)",
    ),
)
for _record in BUILTINS:
    register_builtin(_record)
