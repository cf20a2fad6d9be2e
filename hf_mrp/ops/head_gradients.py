"""The fused loss' gradients for the hidden states, W and b, accumulated chunk by chunk in float32.

Each chunk hands over d(ce_weight * ce [+ lam * closed-form objective]) / dz as a [chunk x V] buffer, and the
objective's lambda-free gradient: at its top-k (and target) ids only ([chunk x k'], [chunk x k x d] for the rows of
W), or as a [chunk x V] buffer for a full-logits objective; the two parts are kept apart until the whole batch is
known (the 'gated' normalization scales the objective part), then `HeadGradients.combine` adds them.
"""

from __future__ import annotations

from typing import Any

import torch

from .chunk_loss import ChunkResult
from .precision import HeadOperands


class HeadGradients:
    """Float32 gradient accumulators for h, W and b: the CE part and the (lambda-free) objective part."""

    def __init__(
        self, hidden: torch.Tensor, head: HeadOperands, need_h: bool, need_w: bool, need_b: bool, objective: bool
    ) -> None:
        f32: dict[str, Any] = dict(dtype=torch.float32, device=hidden.device)
        shape_w, shape_b = (head.vocab, head.width), (head.vocab,)
        self.h = torch.empty(hidden.shape, **f32) if need_h else None
        self.w = torch.zeros(shape_w, **f32) if need_w else None
        self.b = torch.zeros(shape_b, **f32) if need_b else None
        self.h_obj = torch.zeros(hidden.shape, **f32) if need_h and objective else None
        self.w_obj = torch.zeros(shape_w, **f32) if need_w and objective else None
        self.b_obj = torch.zeros(shape_b, **f32) if need_b and objective else None

    def add_chunk(self, start: int, stop: int, h: torch.Tensor, head: HeadOperands, chunk: ChunkResult) -> None:
        grad_logits = chunk.grad_logits
        if grad_logits is None:  # the CE weighs 0 and no closed form: nothing dense
            if self.h is not None:
                self.h[start:stop] = 0.0
        else:
            self._add_dense(self.h, self.w, self.b, start, stop, h, head, grad_logits)
        grads = chunk.objective_grads
        if grads is None:
            return
        if grads.full is not None:
            if self.h_obj is not None:
                self.h_obj[start:stop] += head.hidden_grad(grads.full)
            self._add_dense(None, self.w_obj, self.b_obj, start, stop, h, head, grads.full)
        if grads.top is not None:
            self._add_sparse(start, stop, h, head, grads.ids, grads.top)
        if grads.rows is not None and self.w_obj is not None:
            assert grads.row_ids is not None  # set with the rows' gradient
            self.w_obj.index_add_(0, grads.row_ids.reshape(-1), grads.rows.reshape(-1, h.shape[1]))

    def _add_dense(self, acc_h, acc_w, acc_b, start: int, stop: int, h, head: HeadOperands, grad: torch.Tensor):
        """A [chunk x V] logits gradient: two matmuls (h, W) and a sum (b)."""
        if acc_h is not None:
            acc_h[start:stop] = head.hidden_grad(grad)
        if acc_w is not None:
            head.add_weight_grad(acc_w, grad, h)
        if acc_b is not None:
            acc_b += grad.sum(0)

    def _add_sparse(self, start: int, stop: int, h, head: HeadOperands, ids: torch.Tensor, grad: torch.Tensor):
        """A gradient at k' logits per position ([chunk x k'] at ``ids``): k' rows instead of a [chunk x V] scatter."""
        if self.h_obj is not None:  # sum_k g_k w'_k
            self.h_obj[start:stop] += torch.bmm(grad[:, None, :], head.rows(ids)).squeeze(1)
        flat = ids.reshape(-1)
        if self.w_obj is not None:
            self.w_obj.index_add_(0, flat, (grad[:, :, None] * h[:, None, :]).reshape(-1, h.shape[1]))
        if self.b_obj is not None:
            self.b_obj.index_add_(0, flat, grad.reshape(-1))

    def combine(self, lam: float | torch.Tensor, scale: float) -> list[torch.Tensor | None]:
        """CE part + lam * objective part; W and b gradients through W' = scale * W. ``lam`` may be a device
        scalar (a gated objective's per-micro-batch factor), read by no host."""
        out = []
        for total, objective, head_param in (
            (self.h, self.h_obj, False),
            (self.w, self.w_obj, True),
            (self.b, self.b_obj, True),
        ):
            if total is not None and objective is not None and not (isinstance(lam, float) and lam == 0.0):
                total.add_(objective.mul_(lam))  # the objective's buffer is not used again
            if total is not None and head_param and scale != 1.0:
                total.mul_(scale)
            out.append(total)
        return out
