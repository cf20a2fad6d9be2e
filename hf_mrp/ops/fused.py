"""Cross-entropy plus an MRP objective, fused per chunk of positions.

For each chunk the logits are computed once in float32 (through the model's own logit transform:
scale and soft cap, `transform.py`), the loss terms and their gradient with respect to those logits
are taken right away (in closed form, in the logits buffer), and turned into gradients for the hidden
states (and W, when it trains); the backward pass only scales those. No [positions x vocab] tensor
lives beyond one chunk, and no logits are recomputed. Because the gradients exist at the end of the
forward, the head's weight only has to be whole during the forward (FSDP / ZeRO-3 gather it there).

All of it runs with autocast off and reads W through `precision.HeadOperands`, so the logits are float32
whatever the Trainer's bf16 / fp16 or the model's dtype (``precision="bfloat16"``: the opt-in of bf16 operands,
float32 accumulation); the gradients are handed back in the dtypes of the hidden states, W and b.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .margins import chunk_softmax
from .objectives import fisher_penalty, margin_penalty
from .precision import HeadOperands, autocast_off
from .settings import NORMALIZATIONS, MRPSettings
from .transform import IDENTITY, LogitTransform

DEFAULT_SETTINGS = MRPSettings()  # the MRP config fields' defaults

__all__ = ["IGNORE_INDEX", "NORMALIZATIONS", "MRPLossSums", "MRPSettings", "mrp_loss_sums"]

IGNORE_INDEX = -100  # a label (target) that carries no loss, as in torch and transformers


@dataclass
class MRPLossSums:
    """Sums over valid positions; divide by the number of items to get means.

    ``total`` = ce + lam * objective carries the gradient; the others are detached. ``objective`` is
    already normalized as asked (see `mrp_loss_sums`); ``n_gated`` counts positions with margin < tau,
    ``n_correct`` those whose top-1 token is the target; ``entropy`` sums the predictive entropy (only
    when asked for: it costs one more [chunk x V] pass).
    """

    total: torch.Tensor
    ce: torch.Tensor
    objective: torch.Tensor
    margin: torch.Tensor
    n_positions: int
    n_gated: int = 0
    n_correct: int = 0
    entropy: torch.Tensor | None = None


@dataclass
class _ChunkResult:
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


def _top_k_objective(top_values, top_rows, objective, tau, weights):
    if objective == "margin":
        penalty = margin_penalty(top_values, tau)
    else:
        penalty = fisher_penalty(top_values, top_rows)
    return (penalty * weights).sum() if weights is not None else penalty.sum()


def _chunk(
    h: torch.Tensor,
    head: HeadOperands,
    targets: torch.Tensor,
    weights: torch.Tensor | None,
    settings: MRPSettings,
    transform: LogitTransform,
    with_entropy: bool,
    need_grad: bool,
    need_rows_grad: bool,
) -> _ChunkResult:
    """Loss sums of one chunk and, when asked, their gradients with respect to its raw logits.

    The CE (and entropy) gradient is written in closed form into the logits buffer itself
    (softmax - one-hot; with label smoothing eps: softmax - (1 - eps) one-hot - eps / V), so a chunk costs one
    [chunk x V] float32 buffer (two with a soft cap or the entropy objective) and the same passes over it as
    plain cross-entropy's forward and backward. The margin and Fisher objectives only see the top-k logits:
    their gradient stays [chunk x k], unscaled by lambda, so the caller can normalize it once the whole batch
    is known.
    """
    objective, lam = settings.objective, settings.lam
    logits = transform.cap_(head.logits(h))  # the logits the model emits
    cap_slope = transform.cap_derivative(logits) if need_grad and transform.softcap is not None else None
    smoothing = settings.label_smoothing
    logit_sum = logits.sum(-1) if smoothing else None  # before chunk_softmax shifts the buffer in place
    entropy = objective == "entropy" and lam != 0.0
    keep_shifted = entropy or with_entropy
    parts = chunk_softmax(logits, targets, settings.top_k if objective == "fisher" else 2, keep_shifted=keep_shifted)
    top_values, top_ids, target_logit, peak, shifted, exp, total, log_total = parts
    nll = peak.squeeze(1) + log_total - target_logit
    ce = (
        nll
        if logit_sum is None
        else _label_smoothed(nll, peak.squeeze(1) + log_total, logit_sum, smoothing, head.vocab)
    ).sum()
    margins = top_values[:, 0] - top_values[:, 1]
    n_gated = (margins < settings.tau).sum()
    n_correct = (top_ids[:, 0] == targets).sum()
    objective_sum = torch.zeros((), device=h.device)
    grad_top = grad_rows = None
    if lam != 0.0 and not entropy:
        with torch.enable_grad():
            values = top_values.detach().requires_grad_(need_grad)
            rows = head.rows(top_ids).detach().requires_grad_(need_rows_grad) if objective == "fisher" else None
            objective_sum = _top_k_objective(values, rows, objective, settings.tau, weights)
            if need_grad and objective_sum.requires_grad:
                grads = torch.autograd.grad(
                    objective_sum, [values] + ([rows] if rows is not None and need_rows_grad else [])
                )
                grad_top = grads[0]
                grad_rows = grads[1] if need_rows_grad else None
        objective_sum = objective_sum.detach()
        if grad_top is not None and cap_slope is not None:
            grad_top = grad_top * cap_slope.gather(1, top_ids)
    entropy_values = parts.entropy() if keep_shifted else None
    entropy_sum = entropy_values.sum() if entropy_values is not None else torch.zeros((), device=h.device)
    if entropy:
        assert entropy_values is not None  # the entropy objective keeps the shifted logits
        objective_sum = (entropy_values * weights).sum() if weights is not None else entropy_values.sum()
    if not need_grad:
        return _ChunkResult(
            ce, objective_sum, margins.sum(), n_gated, n_correct, entropy_sum, None, top_ids, None, None
        )
    grad = exp.div_(total[:, None])  # softmax p, in place
    if entropy:  # dH/dz = -p (log p + H):  grad = p * (1 - lam * w * (log p + H))
        assert entropy_values is not None
        scale = lam if weights is None else lam * weights[:, None]
        factor = shifted.sub_((log_total - entropy_values)[:, None]).mul_(-scale).add_(1.0)
        grad.mul_(factor)
    rows_index = torch.arange(grad.shape[0], device=grad.device)
    grad[rows_index, targets] -= 1.0 - smoothing
    if smoothing:
        grad.sub_(smoothing / head.vocab)
    if cap_slope is not None:
        grad.mul_(cap_slope)
    return _ChunkResult(
        ce, objective_sum, margins.sum(), n_gated, n_correct, entropy_sum, grad, top_ids, grad_top, grad_rows
    )


def _label_smoothed(
    nll: torch.Tensor, log_norm: torch.Tensor, logit_sum: torch.Tensor, eps: float, vocab: int
) -> torch.Tensor:
    """transformers' LabelSmoother per position, in closed form: (1 - eps) * (-log p_y) + eps * mean_j (-log p_j),
    where mean_j (-log p_j) = log Z - mean_j z_j over the V emitted logits."""
    return (1.0 - eps) * nll + eps * (log_norm - logit_sum / vocab)


class _Gradients:
    """Float32 gradient accumulators for h, W and b: the CE part and the (lambda-free) top-k objective part."""

    def __init__(
        self, hidden: torch.Tensor, head: HeadOperands, need_h: bool, need_w: bool, need_b: bool, sparse_objective: bool
    ) -> None:
        f32: dict[str, Any] = dict(dtype=torch.float32, device=hidden.device)
        shape_w, shape_b = (head.vocab, head.width), (head.vocab,)
        self.h = torch.empty(hidden.shape, **f32) if need_h else None
        self.w = torch.zeros(shape_w, **f32) if need_w else None
        self.b = torch.zeros(shape_b, **f32) if need_b else None
        self.h_obj = torch.zeros(hidden.shape, **f32) if need_h and sparse_objective else None
        self.w_obj = torch.zeros(shape_w, **f32) if need_w and sparse_objective else None
        self.b_obj = torch.zeros(shape_b, **f32) if need_b and sparse_objective else None

    def add_chunk(self, start: int, stop: int, h: torch.Tensor, head: HeadOperands, chunk: _ChunkResult) -> None:
        grad_logits = chunk.grad_logits
        assert grad_logits is not None  # gradients are only added for chunks computed with need_grad
        if self.h is not None:
            self.h[start:stop] = head.hidden_grad(grad_logits)
        if self.w is not None:
            head.add_weight_grad(self.w, grad_logits, h)
        if self.b is not None:
            self.b += grad_logits.sum(0)
        if chunk.grad_top is None:
            return
        ids = chunk.top_ids.reshape(-1)
        if self.h_obj is not None:  # sum_k g_k w'_k: k rows instead of a [chunk x V] scatter
            self.h_obj[start:stop] = torch.bmm(chunk.grad_top[:, None, :], head.rows(chunk.top_ids)).squeeze(1)
        if self.w_obj is not None:
            outer = chunk.grad_top[:, :, None] * h[:, None, :]
            if chunk.grad_rows is not None:
                outer = outer + chunk.grad_rows
            self.w_obj.index_add_(0, ids, outer.reshape(-1, h.shape[1]))
        if self.b_obj is not None:
            self.b_obj.index_add_(0, ids, chunk.grad_top.reshape(-1))

    def combine(self, lam: float, scale: float) -> list[torch.Tensor | None]:
        """CE part + lam * objective part; W and b gradients through W' = scale * W."""
        out = []
        for total, objective, head_param in (
            (self.h, self.h_obj, False),
            (self.w, self.w_obj, True),
            (self.b, self.b_obj, True),
        ):
            if total is not None and objective is not None and lam != 0.0:
                total.add_(objective, alpha=lam)
            if total is not None and head_param and scale != 1.0:
                total.mul_(scale)
            out.append(total)
        return out


def _objective_factor(normalization: str, objective: str, n_valid: int, n_gated: int) -> float:
    """Per-micro-batch factor that turns the margin objective's sum over valid positions into the paper's
    mean over gated positions (after the caller divides by the valid positions); 1 otherwise."""
    if normalization != "gated" or objective != "margin":
        return 1.0
    return n_valid / n_gated if n_gated else 0.0


def _fused_sums(hidden, weight, bias, targets, weights, settings: MRPSettings, transform, with_entropy, needs):
    """The chunk loop of `_FusedMRPLoss.forward` (autocast off): the seven sums and the combined gradients."""
    need_h, need_w, need_b = needs
    need_grad = need_h or need_w or need_b
    head = HeadOperands(weight, bias, transform, settings.precision)
    lam, objective = settings.lam, settings.objective
    sparse = lam != 0.0 and objective != "entropy"
    grads = _Gradients(hidden, head, need_h, need_w, need_b, sparse) if need_grad else None
    sums = torch.zeros(6, dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], settings.chunk_size):
        stop = start + settings.chunk_size
        h = hidden[start:stop].float()
        chunk = _chunk(
            h,
            head,
            targets[start:stop],
            None if weights is None else weights[start:stop].float(),
            settings,
            transform,
            with_entropy,
            need_grad,
            need_w and objective == "fisher",
        )
        sums += torch.stack(
            [chunk.ce, chunk.objective, chunk.margin, chunk.n_gated, chunk.n_correct, chunk.entropy]
        ).double()
        if grads is not None:
            grads.add_chunk(start, stop, h, head, chunk)
        del chunk
    ce, obj, margin, n_gated, n_correct, entropy = sums.unbind()
    factor = _objective_factor(settings.normalization, objective, hidden.shape[0], int(n_gated))
    obj = obj * factor
    outputs = grads.combine(lam * factor if sparse else 0.0, head.scale) if grads is not None else [None] * 3
    total = (ce + lam * obj).float()
    statistics = tuple(value.float() for value in (ce, obj, margin, n_gated, n_correct, entropy))
    return total, statistics, outputs


class _FusedMRPLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, settings: MRPSettings, transform, with_entropy):
        needs = tuple(ctx.needs_input_grad[:3])
        with autocast_off(hidden, weight):
            total, statistics, outputs = _fused_sums(
                hidden, weight, bias, targets, weights, settings, transform, with_entropy, needs
            )
        ctx.save_for_backward(*(g for g in outputs if g is not None))
        ctx.flags = needs
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(*statistics)
        return (total, *statistics)

    @staticmethod
    def backward(ctx, grad_total, *_unused):
        """The saved float32 gradients times the incoming scalar (a grad scaler's scale too), in each input's dtype."""
        saved = iter(ctx.saved_tensors)
        outputs = []
        for flag, dtype in zip(ctx.flags, ctx.dtypes):
            outputs.append((next(saved) * grad_total.float()).to(dtype) if flag else None)
        return (*outputs, None, None, None, None, None)


def mrp_loss_sums(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    settings: MRPSettings = DEFAULT_SETTINGS,
    *,
    bias: torch.Tensor | None = None,
    position_weights: torch.Tensor | None = None,
    transform: LogitTransform = IDENTITY,
    with_entropy: bool = False,
) -> MRPLossSums:
    """Summed CE + lam * objective over positions whose target is not -100 (``settings``: `MRPSettings`, checked
    when built; a config's ``mrp_settings``).

    ``hidden`` [..., d] are final hidden states (after the final norm) already aligned with
    ``targets`` [...] (i.e. shifted); the logits are ``transform(hidden @ weight.T + bias)``, in float32
    whatever autocast or the inputs' dtype (``settings.precision="bfloat16"``: bf16 operands, float32 accumulation).
    ``position_weights`` [...] optionally weight each position's objective term (e.g. to target token
    classes); CE is never weighted. ``settings.normalization='gated'`` scales the margin objective's sum by
    n_valid / n_gated, so that once the caller divides by the valid positions it is the paper's mean over
    the gated positions (m < tau) of this call; 'valid' (and every other objective) leaves the sum as is.
    ``settings.label_smoothing`` eps makes the CE term transformers' ``LabelSmoother``'s: (1 - eps) * NLL + eps * the
    mean over the vocabulary of -log p (``ce`` is then that smoothed sum).
    Divide the sums by the number of items (the Trainer's ``num_items_in_batch``) to get the loss.
    ``with_entropy`` also sums the predictive entropy (TRL's ``entropy`` metric).
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    valid = flat_targets != IGNORE_INDEX
    flat_hidden, flat_targets = flat_hidden[valid], flat_targets[valid]
    weights = None if position_weights is None else position_weights.reshape(-1)[valid].detach()
    total, ce, obj, margin, n_gated, n_correct, entropy = _FusedMRPLoss.apply(
        flat_hidden, weight, bias, flat_targets, weights, settings, transform, bool(with_entropy)
    )
    return MRPLossSums(
        total=total,
        ce=ce,
        objective=obj,
        margin=margin,
        n_positions=int(flat_targets.shape[0]),
        n_gated=int(n_gated),
        n_correct=int(n_correct),
        entropy=entropy if with_entropy else None,
    )
