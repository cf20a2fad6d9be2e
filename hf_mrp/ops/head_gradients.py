"""The fused loss' gradients for the hidden states, W and b, accumulated chunk by chunk in float32.

Each chunk hands over d(ce_weight * ce [+ lam * closed-form objective]) / dz as a [chunk x V] buffer, and the
objective's lambda-free gradient: at its top-k (and target) ids only ([chunk x k'], [chunk x k x d] for the rows of
W), or as a [chunk x V] buffer for a full-logits objective; the two parts are kept apart until the whole batch is
known (the 'gated' normalization scales the objective part), then `HeadGradients.combine` adds them. A ``layers``
objective's depth part (depth_loss.py) has its own: the target layers' states' gradients and W's and b's depth part,
scaled by its own normalization. A top-k objective's part of W's gradient is k' rows a position: it is kept as those
rows (`RowsGradient`) and added into W's gradient once, at `combine`, instead of into a [V x d] buffer of its own that
must be zeroed, then read and added (two passes over 2.5 GB at V = 248,320, d = 2,560).
"""

from __future__ import annotations

from typing import Any

import torch

from .chunk_loss import ChunkResult
from .precision import HeadOperands


class RowsGradient:
    """A lambda-free part of W's [V x d] gradient, held as the (ids, rows) pairs that make it while they are fewer
    than V rows, else (or once a full-logits objective adds a dense part) as a dense buffer."""

    def __init__(self, shape: tuple[int, int], device: torch.device) -> None:
        self.shape, self.device = shape, device
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.count = 0
        self.dense: torch.Tensor | None = None

    def add_rows(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """``rows[i]`` adds to row ``ids[i]`` ([n] ids, [n x d] rows, a fresh tensor this keeps)."""
        if self.dense is not None:
            self.dense.index_add_(0, ids, rows)
            return
        self.parts.append((ids, rows))
        self.count += ids.numel()
        if self.count >= self.shape[0]:  # as large as the dense buffer: fold into one
            self.to_dense()

    def to_dense(self) -> torch.Tensor:
        if self.dense is None:
            self.dense = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
            for ids, rows in self.parts:
                self.dense.index_add_(0, ids, rows)
            self.parts = []
        return self.dense

    def add_to(self, total: torch.Tensor, factor: float | torch.Tensor) -> None:
        """total += factor * this part (a device scalar ``factor`` is read by no host)."""
        if self.dense is not None:
            total.add_(self.dense.mul_(factor))  # not used again
            return
        for ids, rows in self.parts:
            if isinstance(factor, torch.Tensor):
                total.index_add_(0, ids, rows.mul_(factor))
            else:
                total.index_add_(0, ids, rows, alpha=factor)


class HeadGradients:
    """Float32 gradient accumulators for h, W and b: the CE part and the (lambda-free) objective part."""

    def __init__(
        self,
        hidden: torch.Tensor,
        head: HeadOperands,
        need_h: bool,
        need_w: bool,
        need_b: bool,
        objective: bool,
        depth: tuple[list[torch.Tensor], list[bool]] = ([], []),
    ) -> None:
        f32: dict[str, Any] = dict(dtype=torch.float32, device=hidden.device)
        shape_w, shape_b = (head.vocab, head.width), (head.vocab,)
        self.h = torch.empty(hidden.shape, **f32) if need_h else None
        self.need_w, self.shape_w, self.device = need_w, shape_w, hidden.device
        self.w: torch.Tensor | None = None  # the first dense chunk's matmul writes it (`HeadOperands.weight_grad`)
        self.b = torch.zeros(shape_b, **f32) if need_b else None
        self.h_obj = torch.zeros(hidden.shape, **f32) if need_h and objective else None
        self.w_obj = RowsGradient(shape_w, hidden.device) if need_w and objective else None
        self.b_obj = torch.zeros(shape_b, **f32) if need_b and objective else None
        states, need_states = depth
        self.depth_h = [torch.zeros(s.shape, **f32) if need else None for s, need in zip(states, need_states)]
        self.w_depth = RowsGradient(shape_w, hidden.device) if need_w and states else None
        self.b_depth = torch.zeros(shape_b, **f32) if need_b and states else None

    def add_chunk(self, start: int, stop: int, h: torch.Tensor, head: HeadOperands, chunk: ChunkResult) -> None:
        grad_logits = chunk.grad_logits
        if grad_logits is None:  # the CE weighs 0 and no closed form: nothing dense
            if self.h is not None:
                self.h[start:stop] = 0.0
        else:
            self._add_dense(self.h, None, self.b, start, stop, h, head, grad_logits)
            if self.need_w:
                if self.w is None:
                    self.w = head.weight_grad(grad_logits, h)
                else:
                    head.add_weight_grad(self.w, grad_logits, h)
        grads = chunk.objective_grads
        if grads is None:
            return
        if grads.full is not None:
            if self.h_obj is not None:
                self.h_obj[start:stop] += head.hidden_grad(grads.full)
            self._add_dense(
                None,
                None if self.w_obj is None else self.w_obj.to_dense(),
                self.b_obj,
                start,
                stop,
                h,
                head,
                grads.full,
            )
        self._add_sparse((self.h_obj, self.w_obj, self.b_obj), start, stop, h, head, grads)

    def add_depth_chunk(self, layer: int, start: int, stop: int, u: torch.Tensor, head: HeadOperands, grads) -> None:
        """The depth objective's gradient of target layer ``layer`` (its index in the target layers) on one chunk."""
        self._add_sparse((self.depth_h[layer], self.w_depth, self.b_depth), start, stop, u, head, grads)

    def _add_dense(self, acc_h, acc_w, acc_b, start: int, stop: int, h, head: HeadOperands, grad: torch.Tensor):
        """A [chunk x V] logits gradient: two matmuls (h, W) and a sum (b)."""
        if acc_h is not None:
            acc_h[start:stop] = head.hidden_grad(grad)
        if acc_w is not None:
            head.add_weight_grad(acc_w, grad, h)
        if acc_b is not None:
            acc_b += grad.sum(0)

    @staticmethod
    def _add_sparse(accumulators, start: int, stop: int, h, head: HeadOperands, grads) -> None:
        """A gradient at k' logits per position ([chunk x k'] at ``grads.ids``): k' rows instead of a [chunk x V]
        scatter; and the gradient of the k rows of W' a rows objective read."""
        acc_h, acc_w, acc_b = accumulators
        grad, ids = grads.top, grads.ids
        if grad is not None:
            if acc_h is not None:  # sum_k g_k w'_k
                acc_h[start:stop] += torch.bmm(grad[:, None, :], head.rows(ids)).squeeze(1)
            flat = ids.reshape(-1)
            if acc_w is not None:
                acc_w.add_rows(flat, (grad[:, :, None] * h[:, None, :]).reshape(-1, h.shape[1]))
            if acc_b is not None:
                acc_b.index_add_(0, flat, grad.reshape(-1))
        if grads.rows is not None and acc_w is not None:
            assert grads.row_ids is not None  # set with the rows' gradient
            acc_w.add_rows(grads.row_ids.reshape(-1), grads.rows.reshape(-1, h.shape[1]))

    def combine(
        self, lam: float | torch.Tensor, scale: float, depth_lam: float | torch.Tensor = 0.0
    ) -> list[torch.Tensor | None]:
        """[h, W, b, *the target layers' states]: CE part + lam * objective part (+ depth_lam * the depth part); W
        and b gradients through W' = scale * W. ``lam`` and ``depth_lam`` may be device scalars (a gated objective's
        per-micro-batch factor), read by no host."""
        if self.need_w and self.w is None:  # no dense chunk (CE weight 0, no closed form): only the objective's
            self.w = torch.zeros(self.shape_w, dtype=torch.float32, device=self.device)
        out = []
        for total, parts, head_param in (
            (self.h, [(self.h_obj, lam)], False),
            (self.w, [(self.w_obj, lam), (self.w_depth, depth_lam)], True),
            (self.b, [(self.b_obj, lam), (self.b_depth, depth_lam)], True),
        ):
            for objective, factor in parts:
                if total is None or objective is None or (isinstance(factor, float) and factor == 0.0):
                    continue
                if isinstance(objective, RowsGradient):
                    objective.add_to(total, factor)
                else:
                    total.add_(objective.mul_(factor))  # the objective's buffer is not used again
            if total is not None and head_param and scale != 1.0:
                total.mul_(scale)
            out.append(total)
        return out + [None if grad is None else grad.mul_(depth_lam) for grad in self.depth_h]
