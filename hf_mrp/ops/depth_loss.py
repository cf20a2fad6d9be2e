"""The depth part of the fused loss: ``mrp_depth_objective`` on the logits of the target layers (the released
``depth`` mode, src/mrp/training.py ``compute_depth_mrp_penalty``), for a registry record with ``layers``.

Each target layer's states u_l (already through the lens the config picks: raw, the final norm, or a tuned lens'
translator and the norm; `training.depth`) go through the same head as the final layer's, chunk by chunk in
float32: z_l = T(u_l W'^T + b'). Only the depth objective's top-k of a chunk's [chunk x V] buffer is kept, and its
penalty runs through the same `evaluate` door and autograd pass as the final layer's
(`chunk_loss._penalty_and_gradients`); its gradient reaches u_l, W and b at the k (and target) ids only. No CE at
these layers: the released depth mode has none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .chunk_loss import ChunkBuffers, ObjectiveGradients, _penalty_and_gradients
from .objectives import TopK
from .precision import HeadOperands
from .settings import MRPSettings
from .transform import LogitTransform


def depth_layer_chunk(
    u: torch.Tensor,
    head: HeadOperands,
    targets: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor,
    settings: MRPSettings,
    transform: LogitTransform,
    need_grad: bool,
    need_rows_grad: bool,
    logits_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ObjectiveGradients | None]:
    """One target layer's chunk: (the depth objective's weighted sum, its gate count (the valid positions when ungated),
    1 if its penalty is not finite somewhere else 0, its lambda-free gradients at the raw logits' ids and W's rows).
    ``logits_out``: the [chunk x V] buffer to compute the logits into (the final layer's, free once its chunk is
    done: a fresh one per layer and chunk pays its page faults each time, `chunk_loss.ChunkBuffers`)."""
    record = settings.depth_record
    k = record.k(settings.top_k)
    logits = transform.cap_(head.logits(u, out=logits_out))
    values, ids = logits.topk(k, dim=-1)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    top = TopK(
        values=values.detach().requires_grad_(need_grad),
        indices=ids,
        target=targets,
        target_logit=target_logit.detach().requires_grad_(need_grad),
        correct=ids[:, 0] == targets,
        tau=settings.tau,
        rows=head.rows(ids).detach().requires_grad_(need_rows_grad) if record.rows else None,
    )
    total, n_gated, nonfinite, grads = _penalty_and_gradients(
        record, top, valid, weights, need_grad, need_rows_grad, None
    )
    if grads is not None and grads.top is not None and transform.softcap is not None:
        grads.top = grads.top * transform.cap_derivative(logits.gather(1, grads.ids))  # through the soft cap
    gated = valid.sum() if n_gated is None else n_gated
    return total, gated, nonfinite, grads


def depth_chunk(
    states: Sequence[torch.Tensor],
    start: int,
    stop: int,
    head: HeadOperands,
    targets: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor,
    settings: MRPSettings,
    transform: LogitTransform,
    needs: tuple[Sequence[bool], bool],
    grads,
    buffers: ChunkBuffers | None = None,
) -> torch.Tensor:
    """Every target layer on positions [start, stop): [objective sum, gated (layer, position) pairs, non-finite]
    summed over the layers; their gradients go to ``grads`` (`HeadGradients`, None: no gradient wanted)."""
    need_states, need_w = needs
    rows_grad = need_w and settings.depth_record.rows
    sums = torch.zeros(3, device=head.weight.device)
    for layer, (u_all, need_u) in enumerate(zip(states, need_states)):
        u = torch.where(valid[:, None], u_all[start:stop].float(), 0.0)  # an ignored position: as the final layer's
        need_grad = grads is not None and (need_u or need_w or grads.b_depth is not None)
        total, gated, nonfinite, found = depth_layer_chunk(
            u,
            head,
            targets,
            valid,
            weights,
            settings,
            transform,
            need_grad,
            rows_grad,
            buffers.take(u.shape[0])[0] if buffers is not None else None,
        )
        sums += torch.stack([total, gated.float(), nonfinite])
        if found is not None:
            grads.add_depth_chunk(layer, start, stop, u, head, found)
    return sums
