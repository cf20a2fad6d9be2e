"""The fused loss' gradients for the hidden states, W and b, accumulated chunk by chunk in float32.

Each chunk hands over d(ce [+ lam * entropy]) / dz as a [chunk x V] buffer, and the margin / Fisher objective's
lambda-free gradient at its top-k ids only ([chunk x k], [chunk x k x d]); the two parts are kept apart until the
whole batch is known (the 'gated' normalization scales the objective part), then `HeadGradients.combine` adds them.
"""

from __future__ import annotations

from typing import Any

import torch

from .chunk_loss import ChunkResult
from .precision import HeadOperands


class HeadGradients:
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

    def add_chunk(self, start: int, stop: int, h: torch.Tensor, head: HeadOperands, chunk: ChunkResult) -> None:
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
