"""One chunk of positions: its loss sums and their gradient with respect to its raw logits (the math `fused.py`
loops over).

The CE gradient is written in closed form into the chunk's logits buffer itself (ce_weight x (softmax - one-hot);
with label smoothing eps: softmax - (1 - eps) one-hot - eps / V), so a chunk costs one [chunk x V] float32 buffer
(two with a soft cap or a closed-form objective such as entropy) and the same passes over it as plain
cross-entropy's forward and backward. Every other objective is its registry record's penalty (`objectives`), run
through autograd on exactly what the record reads: the [chunk x k] top logits and the target's logit, the
[chunk x k x d] rows of W, or (``full_logits``) a copy of the [chunk x V] logits. Its gradient stays apart from
the CE's, unscaled by lambda, so the caller can normalize it once the whole batch is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .margins import ChunkSoftmax, chunk_softmax
from .objectives import ClosedForm, Objective, TopK, evaluate
from .precision import HeadOperands
from .settings import MRPSettings
from .transform import LogitTransform


@dataclass
class ObjectiveGradients:
    """The lambda-free gradients of one chunk's objective sum, with respect to the raw logits at ``ids``
    ([chunk x k'], the top-k ids and maybe the target's), the rows W'[row_ids], and the whole raw logits."""

    ids: torch.Tensor
    top: torch.Tensor | None = None  # [chunk, k']
    row_ids: torch.Tensor | None = None  # [chunk, k]
    rows: torch.Tensor | None = None  # [chunk, k, d] (rows=True and W trains)
    full: torch.Tensor | None = None  # [chunk, V] (full_logits=True)


class ChunkBuffers:
    """The [chunk x V] float32 buffers every chunk of one call writes into (the logits; the exponentials when the
    shifted logits are kept). A fresh tensor this large per chunk pays its page faults again each time on CPU (the
    allocator hands big blocks back to the system), which costs about what one pass over it does."""

    def __init__(self, rows: int, vocab: int, device: torch.device, keep_shifted: bool) -> None:
        self.logits = torch.empty((rows, vocab), dtype=torch.float32, device=device)
        self.exp = torch.empty_like(self.logits) if keep_shifted else None

    def take(self, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.logits[:rows], None if self.exp is None else self.exp[:rows]


@dataclass
class ChunkResult:
    """One chunk's sums (detached) and, when asked, its gradients."""

    ce: torch.Tensor
    objective: torch.Tensor
    margin: torch.Tensor
    n_gated: torch.Tensor
    n_correct: torch.Tensor
    entropy: torch.Tensor  # sum of the predictive entropy (0 unless computed)
    nonfinite: torch.Tensor  # 1 when the objective's penalty is not finite somewhere, else 0
    grad_logits: torch.Tensor | None  # d(ce_weight * ce [+ lam * closed form]) / dz_raw, [chunk, V]; None: all 0
    objective_grads: ObjectiveGradients | None  # the penalty's, through autograd


def chunk_loss(
    h: torch.Tensor,
    head: HeadOperands,
    targets: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor,
    settings: MRPSettings,
    transform: LogitTransform,
    with_entropy: bool,
    need_grad: bool,
    need_rows_grad: bool,
    buffers: ChunkBuffers | None = None,
) -> ChunkResult:
    """Loss sums of one chunk and, when ``need_grad``, their gradients with respect to its raw logits. ``valid``
    marks the positions that count; the others (``h`` zeroed, target clamped by the caller) add nothing to any sum
    and get exact zero gradients (``weights`` 0 there, their 1 / S taken as 0). ``buffers``: `ChunkBuffers`
    built with `keeps_shifted`."""
    record, active = settings.record, settings.lam != 0.0
    closed = record.closed_form if active else None
    logits_out, exp_out = buffers.take(h.shape[0]) if buffers is not None else (None, None)
    logits = transform.cap_(head.logits(h, out=logits_out))  # the logits the model emits
    cap_slope = transform.cap_derivative(logits) if need_grad and transform.softcap is not None else None
    logit_sum = logits.sum(-1) if settings.label_smoothing else None  # before chunk_softmax shifts it in place
    by_autograd = active and closed is None and record.penalty is not None  # None: a depth-only record
    full = logits.clone() if by_autograd and record.full_logits else None
    keep = keeps_shifted(settings, with_entropy)
    parts = chunk_softmax(logits, targets, max(settings.k, 2), exp_out=exp_out if keep else None, keep_shifted=keep)
    ce = _masked_sum(_ce_values(parts, logit_sum, settings.label_smoothing, head.vocab), valid)
    margins = parts.top_values[:, 0] - parts.top_values[:, 1]
    correct = parts.top_ids[:, 0] == targets
    zero = torch.zeros((), device=h.device)
    objective_sum, n_gated, nonfinite, objective_grads = zero, ((margins < settings.tau) & valid).sum(), zero, None
    if by_autograd:
        top = _top_k(parts, targets, correct, head, full, settings, need_grad, need_rows_grad)
        objective_sum, gated, nonfinite, objective_grads = _penalty_and_gradients(
            record, top, valid, weights, need_grad, need_rows_grad, cap_slope
        )
        n_gated = n_gated if gated is None else gated
    entropy_sum = _masked_sum(parts.entropy(), valid) if with_entropy else zero
    closed_values = closed.values(parts) if closed is not None else None
    if closed_values is not None:
        objective_sum = (closed_values * weights).sum()
        nonfinite = (~torch.isfinite(closed_values) & valid).any().float()
    grad = None
    if need_grad and (settings.ce_weight != 0.0 or closed is not None):
        grad = _ce_logit_gradient_(parts, targets, valid, weights, closed, closed_values, settings, cap_slope)
    n_correct = (correct & valid).sum()
    return ChunkResult(
        ce,
        objective_sum,
        _masked_sum(margins, valid),
        n_gated,
        n_correct,
        entropy_sum,
        nonfinite,
        grad,
        objective_grads,
    )


def keeps_shifted(settings: MRPSettings, with_entropy: bool) -> bool:
    """Whether a chunk keeps z - max beside its exponentials (a closed-form objective, or the entropy statistic)."""
    return (settings.lam != 0.0 and settings.record.closed_form is not None) or with_entropy


def _masked_sum(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The sum over the valid positions (an ignored position's value, whatever it is, adds an exact 0)."""
    return torch.where(valid, values, torch.zeros_like(values)).sum()


def _ce_values(parts: ChunkSoftmax, logit_sum: torch.Tensor | None, smoothing: float, vocab: int) -> torch.Tensor:
    """The chunk's cross-entropy per position: -log p_y, label-smoothed when ``logit_sum`` is given."""
    log_norm = parts.peak.squeeze(1) + parts.log_total
    nll = log_norm - parts.target_logit
    return nll if logit_sum is None else _label_smoothed(nll, log_norm, logit_sum, smoothing, vocab)


def _top_k(
    parts: ChunkSoftmax,
    targets: torch.Tensor,
    correct: torch.Tensor,
    head: HeadOperands,
    full: torch.Tensor | None,
    settings: MRPSettings,
    need_grad: bool,
    need_rows_grad: bool,
) -> TopK:
    """What the record reads, as autograd leaves: the k top logits and the target's (always), W'[top ids] (rows)
    and the chunk's logits (full_logits)."""
    k, record = settings.k, settings.record
    ids = parts.top_ids[:, :k]
    return TopK(
        values=parts.top_values[:, :k].detach().requires_grad_(need_grad),
        indices=ids,
        target=targets,
        target_logit=parts.target_logit.detach().requires_grad_(need_grad),
        correct=correct,
        tau=settings.tau,
        rows=head.rows(ids).detach().requires_grad_(need_rows_grad) if record.rows else None,
        logits=None if full is None else full.requires_grad_(need_grad),
    )


def _penalty_and_gradients(
    record: Objective,
    top: TopK,
    valid: torch.Tensor,
    weights: torch.Tensor,
    need_grad: bool,
    need_rows_grad: bool,
    cap_slope: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, ObjectiveGradients | None]:
    """The penalty's weighted sum over the chunk (detached), its gate count over the valid positions (None:
    ungated), whether it is not finite at some valid position, and its lambda-free gradients (one autograd pass)
    with respect to the raw logits (through the soft cap's slope) and to the rows of W'."""
    with torch.enable_grad():
        values, gate = evaluate(record, top)
        total = (values * weights).sum()
        leaves = [top.values, top.target_logit, top.rows if need_rows_grad else None, top.logits]
        wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
        found = torch.autograd.grad(total, wanted, allow_unused=True) if need_grad and total.requires_grad else ()
    by_leaf = {id(leaf): grad for leaf, grad in zip(wanted, found)}
    grad_values, grad_target, grad_rows, grad_full = (by_leaf.get(id(leaf)) for leaf in leaves)
    nonfinite = (~torch.isfinite(values.detach()) & valid).any().float()
    n_gated = None if gate is None else (gate & valid).sum()
    if not need_grad:
        return total.detach(), n_gated, nonfinite, None
    grads = ObjectiveGradients(top.indices, grad_values, top.indices if grad_rows is not None else None, grad_rows)
    if grad_target is not None:  # the target's logit: one more column of ids
        known = grad_values if grad_values is not None else torch.zeros_like(top.values)
        grads.ids = torch.cat([top.indices, top.target[:, None]], dim=1)
        grads.top = torch.cat([known, grad_target[:, None]], dim=1)
    if grad_full is not None:
        grads.full = grad_full if cap_slope is None else grad_full.mul_(cap_slope)
    if grads.top is not None and cap_slope is not None:
        grads.top = grads.top * cap_slope.gather(1, grads.ids)
    return total.detach(), n_gated, nonfinite, grads


def _ce_logit_gradient_(
    parts: ChunkSoftmax,
    targets: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor,
    closed: ClosedForm | None,
    closed_values: torch.Tensor | None,
    settings: MRPSettings,
    cap_slope: torch.Tensor | None,
) -> torch.Tensor:
    """d(ce_weight * ce [+ lam * closed-form objective]) / dz_raw of the chunk, written over its exponentials (and,
    for a closed form, over its shifted logits): no new [chunk x V] buffer. Rows of ignored positions are exact
    zeros (their 1 / S taken as 0, no one-hot, the closed form's weight 0)."""
    inv_total = torch.where(valid, parts.total.reciprocal(), torch.zeros_like(parts.total))[:, None]
    c = settings.ce_weight
    if closed is not None and closed_values is not None:  # c * p + lam * w * dP/dz, in place
        grad = closed.gradient_(parts.exp, parts, closed_values, settings.lam * weights[:, None], c, inv_total)
    else:
        grad = parts.exp.mul_(inv_total if c == 1.0 else c * inv_total)  # c * softmax p; 0 on ignored rows
    rows_index = torch.arange(grad.shape[0], device=grad.device)
    smoothing, counted = settings.label_smoothing, valid.to(grad.dtype)
    grad[rows_index, targets] -= c * (1.0 - smoothing) * counted
    if smoothing:
        grad.sub_((c * smoothing / parts.exp.shape[1]) * counted[:, None])
    if cap_slope is not None:
        grad.mul_(cap_slope)
    return grad


def _label_smoothed(
    nll: torch.Tensor, log_norm: torch.Tensor, logit_sum: torch.Tensor, eps: float, vocab: int
) -> torch.Tensor:
    """transformers' LabelSmoother per position, in closed form: (1 - eps) * (-log p_y) + eps * mean_j (-log p_j),
    where mean_j (-log p_j) = log Z - mean_j z_j over the V emitted logits."""
    return (1.0 - eps) * nll + eps * (log_norm - logit_sum / vocab)
