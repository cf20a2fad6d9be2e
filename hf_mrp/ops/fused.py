"""Cross-entropy plus an MRP objective, fused per chunk of positions.

For each chunk the logits are computed once in float32, the loss terms and their gradient with
respect to those logits are taken right away, and the chunk's logits are freed: the backward
pass only scales the gradients saved for hidden states (and W, when it trains). No [positions x
vocab] tensor lives beyond one chunk, and no logits are recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .margins import output_logits
from .objectives import OBJECTIVES, entropy_penalty, fisher_penalty, margin_penalty


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


def _chunk_terms(
    logits: torch.Tensor,
    targets: torch.Tensor,
    top_rows_fn,
    objective: str,
    lam: float,
    tau: float,
    top_k: int,
    weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(total, ce_sum, objective_sum, margin_sum, top_rows leaf or None, top_ids) of one chunk."""
    ce_sum = F.cross_entropy(logits, targets, reduction="sum")
    top_values, top_ids = logits.topk(max(top_k, 2) if objective == "fisher" else 2, dim=-1)
    margin_sum = (top_values[:, 0] - top_values[:, 1]).detach().sum()
    rows = None
    if lam == 0.0:
        penalty = None
    elif objective == "margin":
        penalty = margin_penalty(top_values, tau)
    elif objective == "fisher":
        rows = top_rows_fn(top_ids)
        penalty = fisher_penalty(top_values, rows)
    else:
        penalty = entropy_penalty(logits)
    if penalty is None:
        objective_sum = torch.zeros((), device=logits.device)
    else:
        objective_sum = (penalty * weights).sum() if weights is not None else penalty.sum()
    total = ce_sum + lam * objective_sum
    return total, ce_sum.detach(), objective_sum.detach(), margin_sum, rows, top_ids


class _FusedMRPLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, objective, lam, tau, top_k, chunk_size):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        needs_grad = need_h or need_w or need_b
        weight32 = weight.float()
        bias32 = None if bias is None else bias.float()
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(weight32) if need_w else None
        grad_b = torch.zeros_like(bias32) if need_b else None
        sums = torch.zeros(4, dtype=torch.float64, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            h = hidden[start:stop].float()
            y = targets[start:stop]
            w_chunk = None if weights is None else weights[start:stop].float()
            logits = output_logits(h, weight32, bias32)
            with torch.enable_grad():
                logits.requires_grad_(needs_grad)
                rows_leaf = []

                def top_rows(ids):
                    rows = weight32[ids].detach().requires_grad_(need_w)
                    rows_leaf.append(rows)
                    return rows

                total, ce, obj, margin, rows, top_ids = _chunk_terms(
                    logits, y, top_rows, objective, lam, tau, top_k, w_chunk
                )
                if needs_grad:
                    inputs = [logits] + ([rows] if rows is not None and need_w else [])
                    grads = torch.autograd.grad(total, inputs)
            sums += torch.stack([total.detach(), ce, obj, margin]).double()
            if not needs_grad:
                continue
            grad_logits = grads[0]
            if need_h:
                grad_h[start:stop] = grad_logits @ weight32
            if need_w:
                grad_w.addmm_(grad_logits.T, h)
                if len(grads) > 1:
                    grad_w.index_add_(0, top_ids.reshape(-1), grads[1].reshape(-1, grad_w.shape[1]))
            if need_b:
                grad_b += grad_logits.sum(0)
            del logits, grads, grad_logits
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.flags = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        total, ce, obj, margin = (value.clone() for value in sums.float())
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
