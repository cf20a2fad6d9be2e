"""Cross-entropy plus an MRP objective, fused per chunk of positions.

For each chunk the logits are computed once in float32, the loss terms and their gradient with
respect to those logits are taken right away (in closed form, in the logits buffer), and turned
into gradients for the hidden states (and W, when it trains); the backward pass only scales
those. No [positions x vocab] tensor lives beyond one chunk, and no logits are recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .margins import output_logits
from .objectives import OBJECTIVES, fisher_penalty, margin_penalty


@dataclass
class MRPLossSums:
    """Sums over valid positions; divide by the number of items to get means.

    ``total`` = ce + lam * objective carries the gradient; the others are detached.
    """

    total: torch.Tensor
    ce: torch.Tensor
    objective: torch.Tensor
    margin: torch.Tensor
    n_positions: int


@dataclass
class _ChunkResult:
    ce: torch.Tensor
    objective: torch.Tensor
    margin: torch.Tensor
    grad_logits: torch.Tensor | None  # d(ce + lam * objective) / dz, [chunk, V]
    top_ids: torch.Tensor
    grad_rows: torch.Tensor | None  # d(lam * objective) / dW[top_ids], [chunk, k, d] (Fisher, W trains)


def _top_k_objective(top_values, top_rows, objective, tau, weights):
    if objective == "margin":
        penalty = margin_penalty(top_values, tau)
    else:
        penalty = fisher_penalty(top_values, top_rows)
    return (penalty * weights).sum() if weights is not None else penalty.sum()


def _chunk(
    h: torch.Tensor,
    weight32: torch.Tensor,
    bias32: torch.Tensor | None,
    targets: torch.Tensor,
    weights: torch.Tensor | None,
    objective: str,
    lam: float,
    tau: float,
    top_k: int,
    need_grad: bool,
    need_rows_grad: bool,
) -> _ChunkResult:
    """Loss sums of one chunk and, when asked, their gradient with respect to its logits.

    The gradient is written in closed form into the logits buffer itself (softmax - one-hot, plus
    the objective's part), so a chunk costs one [chunk x V] float32 buffer (two for entropy) and
    the same passes over it as plain cross-entropy's forward and backward.
    """
    logits = output_logits(h, weight32, bias32)
    k = top_k if objective == "fisher" else 2
    top_values, top_ids = logits.topk(k, dim=-1)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    peak = top_values[:, :1]
    entropy = objective == "entropy" and lam != 0.0
    shifted = logits.sub_(peak)  # z - max, in place
    exp = shifted.exp() if entropy else shifted.exp_()
    total = exp.sum(-1)
    log_total = total.log()
    ce = (peak.squeeze(1) + log_total - target_logit).sum()
    margin = (top_values[:, 0] - top_values[:, 1]).sum()
    objective_sum = torch.zeros((), device=h.device)
    grad_top = grad_rows = None
    if lam != 0.0 and not entropy:
        with torch.enable_grad():
            values = top_values.detach().requires_grad_(need_grad)
            rows = weight32[top_ids].detach().requires_grad_(need_rows_grad) if objective == "fisher" else None
            objective_sum = _top_k_objective(values, rows, objective, tau, weights)
            if need_grad and objective_sum.requires_grad:
                grads = torch.autograd.grad(lam * objective_sum, [values] + ([rows] if need_rows_grad else []))
                grad_top = grads[0]
                grad_rows = grads[1] if need_rows_grad else None
        objective_sum = objective_sum.detach()
    entropy_values = None
    if entropy:  # H = log S - sum(e * (z - max)) / S
        entropy_values = log_total - (exp * shifted).sum(-1) / total
        objective_sum = (entropy_values * weights).sum() if weights is not None else entropy_values.sum()
    if not need_grad:
        return _ChunkResult(ce, objective_sum, margin, None, top_ids, None)
    grad = exp.div_(total[:, None])  # softmax p, in place
    if entropy:  # dH/dz = -p (log p + H):  grad = p * (1 - lam * w * (log p + H))
        scale = lam if weights is None else lam * weights[:, None]
        factor = shifted.sub_((log_total - entropy_values)[:, None]).mul_(-scale).add_(1.0)
        grad.mul_(factor)
    rows_index = torch.arange(grad.shape[0], device=grad.device)
    grad[rows_index, targets] -= 1.0
    if grad_top is not None:
        grad.scatter_add_(1, top_ids, grad_top)
    return _ChunkResult(ce, objective_sum, margin, grad, top_ids, grad_rows)


class _FusedMRPLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, objective, lam, tau, top_k, chunk_size):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_grad = need_h or need_w or need_b
        weight32 = weight.float()
        bias32 = None if bias is None else bias.float()
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(weight32) if need_w else None
        grad_b = torch.zeros_like(bias32) if need_b else None
        sums = torch.zeros(3, dtype=torch.float64, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            h = hidden[start:stop].float()
            chunk = _chunk(
                h, weight32, bias32, targets[start:stop], None if weights is None else weights[start:stop].float(),
                objective, lam, tau, top_k, need_grad, need_w and objective == "fisher",
            )
            sums += torch.stack([chunk.ce, chunk.objective, chunk.margin]).double()
            if not need_grad:
                continue
            if need_h:
                grad_h[start:stop] = chunk.grad_logits @ weight32
            if need_w:
                grad_w.addmm_(chunk.grad_logits.T, h)
                if chunk.grad_rows is not None:
                    grad_w.index_add_(0, chunk.top_ids.reshape(-1), chunk.grad_rows.reshape(-1, grad_w.shape[1]))
            if need_b:
                grad_b += chunk.grad_logits.sum(0)
            del chunk
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.flags = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ce, obj, margin = sums.unbind()
        total = (ce + lam * obj).float()
        ce, obj, margin = (value.float() for value in (ce, obj, margin))
        ctx.mark_non_differentiable(ce, obj, margin)
        return total, ce, obj, margin

    @staticmethod
    def backward(ctx, grad_total, *_unused):
        saved = iter(ctx.saved_tensors)
        outputs = []
        for flag, dtype in zip(ctx.flags, ctx.dtypes):
            outputs.append((next(saved) * grad_total).to(dtype) if flag else None)
        return (*outputs, None, None, None, None, None, None, None)


def mrp_loss_sums(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    objective: str = "fisher",
    lam: float = 0.0,
    tau: float = 1.0,
    top_k: int = 5,
    chunk_size: int = 1024,
    position_weights: torch.Tensor | None = None,
) -> MRPLossSums:
    """Summed CE + lam * objective over positions whose target is not -100.

    ``hidden`` [..., d] are final hidden states (after the final norm) already aligned with
    ``targets`` [...] (i.e. shifted). ``position_weights`` [...] optionally weight each position's
    objective term (e.g. to target token classes); CE is never weighted. Divide the sums by the
    number of items (the Trainer's ``num_items_in_batch``) to get the loss.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    valid = flat_targets != -100
    flat_hidden, flat_targets = flat_hidden[valid], flat_targets[valid]
    weights = None if position_weights is None else position_weights.reshape(-1)[valid].detach()
    total, ce, obj, margin = _FusedMRPLoss.apply(
        flat_hidden, weight, bias, flat_targets, weights, objective, float(lam), float(tau), int(top_k), int(chunk_size)
    )
    return MRPLossSums(total=total, ce=ce, objective=obj, margin=margin, n_positions=int(flat_targets.shape[0]))
