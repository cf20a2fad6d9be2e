"""One chunk of positions: its loss sums and their gradient with respect to its raw logits (the math `fused.py`
loops over).

The CE (and entropy) gradient is written in closed form into the chunk's logits buffer itself (softmax - one-hot;
with label smoothing eps: softmax - (1 - eps) one-hot - eps / V), so a chunk costs one [chunk x V] float32 buffer
(two with a soft cap or the entropy objective) and the same passes over it as plain cross-entropy's forward and
backward. The margin and Fisher objectives only see the top-k logits: their gradient stays [chunk x k], unscaled by
lambda, so the caller can normalize it once the whole batch is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .margins import ChunkSoftmax, chunk_softmax
from .objectives import fisher_penalty, margin_penalty
from .precision import HeadOperands
from .settings import MRPSettings
from .transform import LogitTransform


@dataclass
class ChunkResult:
    """One chunk's sums (detached) and, when asked, its gradients."""

    ce: torch.Tensor
    objective: torch.Tensor
    margin: torch.Tensor
    n_gated: torch.Tensor
    n_correct: torch.Tensor
    entropy: torch.Tensor  # sum of the predictive entropy (0 unless computed)
    grad_logits: torch.Tensor | None  # d(ce [+ lam * entropy]) / dz_raw, [chunk, V]
    top_ids: torch.Tensor
    grad_top: torch.Tensor | None  # d(objective) / dz_raw at the top-k ids, [chunk, k] (margin, Fisher)
    grad_rows: torch.Tensor | None  # d(objective) / dW'[top_ids], [chunk, k, d] (Fisher, W trains)


def chunk_loss(
    h: torch.Tensor,
    head: HeadOperands,
    targets: torch.Tensor,
    weights: torch.Tensor | None,
    settings: MRPSettings,
    transform: LogitTransform,
    with_entropy: bool,
    need_grad: bool,
    need_rows_grad: bool,
) -> ChunkResult:
    """Loss sums of one chunk and, when ``need_grad``, their gradients with respect to its raw logits (see the
    module's docstring for the memory this costs)."""
    objective, lam = settings.objective, settings.lam
    logits = transform.cap_(head.logits(h))  # the logits the model emits
    cap_slope = transform.cap_derivative(logits) if need_grad and transform.softcap is not None else None
    logit_sum = logits.sum(-1) if settings.label_smoothing else None  # before chunk_softmax shifts it in place
    entropy = objective == "entropy" and lam != 0.0
    keep_shifted = entropy or with_entropy
    parts = chunk_softmax(logits, targets, settings.top_k if objective == "fisher" else 2, keep_shifted=keep_shifted)
    ce = _ce_sum(parts, logit_sum, settings.label_smoothing, head.vocab)
    margins = parts.top_values[:, 0] - parts.top_values[:, 1]
    n_gated = (margins < settings.tau).sum()
    n_correct = (parts.top_ids[:, 0] == targets).sum()
    objective_sum = torch.zeros((), device=h.device)
    grad_top = grad_rows = None  # stay None unless need_grad
    if lam != 0.0 and not entropy:
        objective_sum, grad_top, grad_rows = _top_k_objective_and_gradients(
            parts.top_values, parts.top_ids, head, weights, settings, need_grad, need_rows_grad, cap_slope
        )
    entropy_values = parts.entropy() if keep_shifted else None
    entropy_sum = entropy_values.sum() if entropy_values is not None else torch.zeros((), device=h.device)
    if entropy:
        assert entropy_values is not None  # the entropy objective keeps the shifted logits
        objective_sum = (entropy_values * weights).sum() if weights is not None else entropy_values.sum()
    grad = None
    if need_grad:
        entropy_objective = entropy_values if entropy else None
        grad = _ce_logit_gradient_(parts, targets, weights, entropy_objective, settings, head.vocab, cap_slope)
    return ChunkResult(
        ce, objective_sum, margins.sum(), n_gated, n_correct, entropy_sum, grad, parts.top_ids, grad_top, grad_rows
    )


def _ce_sum(parts: ChunkSoftmax, logit_sum: torch.Tensor | None, smoothing: float, vocab: int) -> torch.Tensor:
    """The chunk's summed cross-entropy: -log p_y per position, label-smoothed when ``logit_sum`` is given."""
    log_norm = parts.peak.squeeze(1) + parts.log_total
    nll = log_norm - parts.target_logit
    return (nll if logit_sum is None else _label_smoothed(nll, log_norm, logit_sum, smoothing, vocab)).sum()


def _top_k_objective(top_values, top_rows, objective, tau, weights):
    if objective == "margin":
        penalty = margin_penalty(top_values, tau)
    else:
        penalty = fisher_penalty(top_values, top_rows)
    return (penalty * weights).sum() if weights is not None else penalty.sum()


def _top_k_objective_and_gradients(
    top_values: torch.Tensor,
    top_ids: torch.Tensor,
    head: HeadOperands,
    weights: torch.Tensor | None,
    settings: MRPSettings,
    need_grad: bool,
    need_rows_grad: bool,
    cap_slope: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The margin or Fisher objective's sum over the chunk (detached) and, when asked, its lambda-free gradients
    with respect to the raw top-k logits (through the soft cap's slope) and to the top-k rows of W'."""
    objective = settings.objective
    grad_top = grad_rows = None
    with torch.enable_grad():
        values = top_values.detach().requires_grad_(need_grad)
        rows = head.rows(top_ids).detach().requires_grad_(need_rows_grad) if objective == "fisher" else None
        objective_sum = _top_k_objective(values, rows, objective, settings.tau, weights)
        if need_grad and objective_sum.requires_grad:
            inputs = [values] + ([rows] if rows is not None and need_rows_grad else [])
            grads = torch.autograd.grad(objective_sum, inputs)
            grad_top = grads[0]
            grad_rows = grads[1] if need_rows_grad else None
    if grad_top is not None and cap_slope is not None:
        grad_top = grad_top * cap_slope.gather(1, top_ids)
    return objective_sum.detach(), grad_top, grad_rows


def _ce_logit_gradient_(
    parts: ChunkSoftmax,
    targets: torch.Tensor,
    weights: torch.Tensor | None,
    entropy_values: torch.Tensor | None,
    settings: MRPSettings,
    vocab: int,
    cap_slope: torch.Tensor | None,
) -> torch.Tensor:
    """d(ce [+ lam * entropy]) / dz_raw of the chunk, written over its exponentials (and, for the entropy objective,
    over its shifted logits): no new [chunk x V] buffer. ``entropy_values`` (the entropy per position) only for the
    entropy objective, else None."""
    grad = parts.exp.div_(parts.total[:, None])  # softmax p, in place
    if entropy_values is not None:  # dH/dz = -p (log p + H):  grad = p * (1 - lam * w * (log p + H))
        scale = settings.lam if weights is None else settings.lam * weights[:, None]
        factor = parts.shifted.sub_((parts.log_total - entropy_values)[:, None]).mul_(-scale).add_(1.0)
        grad.mul_(factor)
    rows_index = torch.arange(grad.shape[0], device=grad.device)
    smoothing = settings.label_smoothing
    grad[rows_index, targets] -= 1.0 - smoothing
    if smoothing:
        grad.sub_(smoothing / vocab)
    if cap_slope is not None:
        grad.mul_(cap_slope)
    return grad


def _label_smoothed(
    nll: torch.Tensor, log_norm: torch.Tensor, logit_sum: torch.Tensor, eps: float, vocab: int
) -> torch.Tensor:
    """transformers' LabelSmoother per position, in closed form: (1 - eps) * (-log p_y) + eps * mean_j (-log p_j),
    where mean_j (-log p_j) = log Z - mean_j z_j over the V emitted logits."""
    return (1.0 - eps) * nll + eps * (log_norm - logit_sum / vocab)
