"""Cross-entropy plus an MRP objective, fused per chunk of positions.

For each chunk the logits are computed once in float32 (through the model's own logit transform:
scale and soft cap, `transform.py`), the loss terms and their gradient with respect to those logits
are taken right away (CE in closed form, in the logits buffer; the objective, a registry record, through one
autograd pass over only what it reads), and turned into gradients for the hidden states (and W, when it
trains); the backward pass only scales those. No [positions x vocab] tensor
lives beyond one chunk, and no logits are recomputed. Because the gradients exist at the end of the
forward, the head's weight only has to be whole during the forward (FSDP / ZeRO-3 gather it there).

All of it runs with autocast off and reads W through `precision.HeadOperands`, so the logits are float32
whatever the Trainer's bf16 / fp16 or the model's dtype (``precision="bfloat16"``: the opt-in of bf16 operands,
float32 accumulation); the gradients are handed back in the dtypes of the hidden states, W and b.

Here: the chunk loop and the autograd Function around it. One chunk's math is `chunk_loss.py`; accumulating its
gradients into those of h, W and b is `head_gradients.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MRPUserError
from .chunk_loss import ChunkBuffers, chunk_loss, keeps_shifted
from .depth_loss import depth_chunk
from .head_gradients import HeadGradients
from .precision import HeadOperands, autocast_off
from .settings import NORMALIZATIONS, MRPSettings
from .transform import IDENTITY, LogitTransform

DEFAULT_SETTINGS = MRPSettings()  # the MRP config fields' defaults

__all__ = ["IGNORE_INDEX", "NORMALIZATIONS", "MRPLossSums", "MRPSettings", "mrp_loss_sums"]

IGNORE_INDEX = -100  # a label (target) that carries no loss, as in torch and transformers


@dataclass
class MRPLossSums:
    """Sums over valid positions; divide by the number of items to get means.

    ``total`` = ce_weight * ce + lam * objective carries the gradient; the others are detached (``ce`` unweighted).
    ``objective`` is already normalized as asked (see `mrp_loss_sums`); ``n_gated`` counts the positions a gated
    objective's gate admits (with lam > 0; else the positions with margin < tau),
    ``n_correct`` those whose top-1 token is the target; ``entropy`` sums the predictive entropy (only
    when asked for: it costs one more [chunk x V] pass).
    """

    total: torch.Tensor
    ce: torch.Tensor
    objective: torch.Tensor
    margin: torch.Tensor
    n_positions: torch.Tensor  # the valid positions, a device scalar (int64): counted without a host read
    n_gated: torch.Tensor | int = 0  # device scalars: counted without a host read
    n_correct: torch.Tensor | int = 0
    entropy: torch.Tensor | None = None
    penalty_fault: torch.Tensor | None = None  # with defer_checks: 1 where `penalty_fault_message` applies, else 0
    depth: torch.Tensor | None = None  # a ``layers`` objective's depth term (part of ``objective``), normalized


def _objective_factor(settings: MRPSettings, n_valid: torch.Tensor, n_gated: torch.Tensor) -> torch.Tensor | float:
    """Per-micro-batch factor that turns a gated objective's sum over valid positions into the paper's mean over
    the gated positions (after the caller divides by the valid positions); 1 otherwise. A device scalar: the
    gated count is never read by the host."""
    if settings.normalization != "gated" or not settings.record.gated:
        return 1.0
    return torch.where(n_gated > 0, n_valid.double() / n_gated.clamp(min=1), torch.zeros_like(n_gated))


def _depth_factor(
    settings: MRPSettings, n_valid: torch.Tensor, n_layers: int, depth_gated: torch.Tensor
) -> torch.Tensor | float:
    """The factor of the depth part's sum over (layer, position) pairs: 1 / the number of target layers (the mean
    over the layers of each layer's mean over valid positions, as released), or for a gated depth objective under
    'gated' n_valid / the gated (layer, position) pairs (their mean)."""
    if settings.normalization != "gated" or not settings.depth_record.gated:
        return 1.0 / max(n_layers, 1)
    return torch.where(depth_gated > 0, n_valid.double() / depth_gated.clamp(min=1), torch.zeros_like(depth_gated))


def _fused_sums(
    hidden, weight, bias, targets, weights, settings: MRPSettings, transform, with_entropy, needs, defer, depth
):
    """The chunk loop of `_FusedMRPLoss.forward` (autocast off): the sums and the combined gradients.

    Every position runs through the chunks, an ignored one (target -100) with its hidden state zeroed, its target
    clamped to id 0 and weight 0: it adds nothing and gets exactly zero gradients, and no count sizes the loop
    (a host read per micro-batch, which on a GPU stalls the stream)."""
    need_h, need_w, need_b = needs[:3]
    need_grad = any(needs)
    head = HeadOperands(weight, bias, transform, settings.precision)
    lam, record = settings.lam, settings.record
    by_autograd = lam != 0.0 and record.closed_form is None and record.penalty is not None  # kept apart
    grads = HeadGradients(hidden, head, need_h, need_w, need_b, by_autograd, (depth, needs[3:])) if need_grad else None
    sums = torch.zeros(10, dtype=torch.float64, device=hidden.device)
    valid = targets != IGNORE_INDEX
    weights = valid.float() if weights is None else torch.where(valid, weights.float(), 0.0)
    targets = torch.where(valid, targets, 0)
    rows = min(settings.chunk_size, hidden.shape[0])
    buffers = ChunkBuffers(rows, head.vocab, hidden.device, keeps_shifted(settings, with_entropy)) if rows else None
    for start in range(0, hidden.shape[0], settings.chunk_size):
        stop = start + settings.chunk_size
        h = torch.where(valid[start:stop, None], hidden[start:stop].float(), 0.0)
        chunk = chunk_loss(
            h,
            head,
            targets[start:stop],
            valid[start:stop],
            weights[start:stop],
            settings,
            transform,
            with_entropy,
            need_grad,
            need_w and record.rows,
            buffers,
        )
        parts = [chunk.ce, chunk.objective, chunk.margin, chunk.n_gated, chunk.n_correct, chunk.entropy]
        sums[:7] += torch.stack(parts + [chunk.nonfinite]).double()
        if grads is not None:
            grads.add_chunk(start, stop, h, head, chunk)
        del chunk
        if depth:
            part = depth_chunk(depth, start, stop, head, targets[start:stop], valid[start:stop], weights[start:stop],
                               settings, transform, (needs[3:], need_w), grads, buffers)  # fmt: skip
            sums[7:] += part.double()
    ce, obj, margin, n_gated, n_correct, entropy, nonfinite, depth_sum, depth_gated, depth_nonfinite = sums.unbind()
    fault = (nonfinite + depth_nonfinite > 0) & torch.isfinite(ce)
    if not defer and bool(fault):  # deferred (the trainers' hot path): they read it at their next check
        raise MRPUserError(penalty_fault_message(record.name))
    n_valid = valid.sum()
    factor = _objective_factor(settings, n_valid, n_gated)
    depth_factor = _depth_factor(settings, n_valid, len(depth), depth_gated)
    depth_term = depth_sum * depth_factor
    obj = obj * factor + depth_term
    lams = (lam * factor if by_autograd else 0.0, head.scale, lam * depth_factor if depth else 0.0)
    outputs = grads.combine(*lams) if grads is not None else [None] * (3 + len(depth))
    total = (settings.ce_weight * ce + lam * obj).float()
    statistics = tuple(value.float() for value in (ce, obj, margin, n_gated, n_correct, entropy, fault, depth_term))
    return total, statistics, outputs


def penalty_fault_message(name: str) -> str:
    """A penalty that is NaN / inf on logits whose cross-entropy is finite is the objective's fault: refused by name.
    (Non-finite logits, or mrp_weights, are the data's: the trainers skip such a batch.)"""
    return (
        f"objective {name!r}: its penalty is not finite (NaN or inf) at some position whose logits are finite; "
        "make it finite for every input (clamp it, or guard its divisions and logs)"
    )


class _FusedMRPLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, settings, transform, with_entropy, defer, *depth):
        """``depth``: the target layers' states of a ``layers`` objective (through its lens), [N, d] each."""
        needs = tuple(ctx.needs_input_grad[:3]) + tuple(ctx.needs_input_grad[9:])
        with autocast_off(hidden, weight, *depth):
            total, statistics, outputs = _fused_sums(
                hidden, weight, bias, targets, weights, settings, transform, with_entropy, needs, defer, depth
            )
        # kept on ctx, not saved for backward: backward scales them in place (they are no input or output of the
        # function, so no reference cycle), and marks them used so that a second backward refuses to rescale them
        ctx.gradients = [g for g in outputs if g is not None]
        ctx.flags = needs
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype) + tuple(u.dtype for u in depth)
        ctx.mark_non_differentiable(*statistics)
        return (total, *statistics)

    @staticmethod
    def backward(ctx, grad_total, *_unused):
        """The forward's float32 gradients times the incoming scalar (a grad scaler's scale too), in each input's
        dtype, scaled in place (W's is [V x d]: a where over fresh copies cost the paper's head a third of its time).
        An incoming exact 0 gives exact zeros even where the gradient is not finite: a skipped micro-batch
        (MRPTrainerMixin: its non-finite loss replaced by 0 on the device) contributes nothing, not 0 x NaN."""
        if ctx.gradients is None:
            raise RuntimeError(
                "the fused MRP loss runs backward once (its gradients are scaled in place); compute the loss again "
                "for another backward pass"
            )
        saved, ctx.gradients = iter(ctx.gradients), None
        scale = grad_total.float()
        outputs = []
        for flag, dtype in zip(ctx.flags, ctx.dtypes):
            if flag:
                gradient = next(saved).masked_fill_(scale == 0, 0.0).mul_(scale)  # no host read of the scale
                outputs.append(gradient.to(dtype))
            else:
                outputs.append(None)
        return (*outputs[:3], None, None, None, None, None, None, *outputs[3:])


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
    defer_checks: bool = False,
    depth_states: tuple[torch.Tensor, ...] = (),
) -> MRPLossSums:
    """Summed ce_weight * CE + lam * objective over positions whose target is not -100 (``settings``:
    `MRPSettings`, checked when built; a config's ``mrp_settings``).

    ``hidden`` [..., d] are final hidden states (after the final norm) already aligned with
    ``targets`` [...] (i.e. shifted); the logits are ``transform(hidden @ weight.T + bias)``, in float32
    whatever autocast or the inputs' dtype (``settings.precision="bfloat16"``: bf16 operands, float32 accumulation).
    ``position_weights`` [...] optionally weight each position's objective term (e.g. to target token
    classes); CE is never weighted. The objective is ``settings.record``, a registered one (`objectives`).
    ``settings.normalization='gated'`` scales a gated objective's sum (margin, correct_margin, proxy_gated, a
    user's gated penalty) by n_valid / n_gated, so that once the caller divides by the valid positions it is the
    paper's mean over the gated positions of this call; 'valid' (and every ungated objective) leaves the sum as is.
    ``settings.label_smoothing`` eps makes the CE term transformers' ``LabelSmoother``'s: (1 - eps) * NLL + eps * the
    mean over the vocabulary of -log p (``ce`` is then that smoothed sum).
    Divide the sums by the number of items (the Trainer's ``num_items_in_batch``) to get the loss.
    ``with_entropy`` also sums the predictive entropy (TRL's ``entropy`` metric).
    ``defer_checks`` (the trainers' hot path) leaves the objective's finiteness check to the caller: no host read
    here, ``penalty_fault`` says whether `penalty_fault_message` applies.
    ``depth_states`` (a ``layers`` objective: depth, combined) are the target layers' states [..., d] aligned like
    ``hidden``, already through the lens (`training.depth`); their logits T(u W^T + b) carry ``mrp_depth_objective``,
    averaged over the layers (``sums.depth``, inside ``sums.objective``); gradients reach them too.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    weights = None if position_weights is None else position_weights.reshape(-1).detach()
    depth = [u.reshape(-1, u.shape[-1]) for u in depth_states] if settings.lam != 0.0 else []
    total, ce, obj, margin, n_gated, n_correct, entropy, fault, depth_term = _FusedMRPLoss.apply(
        flat_hidden, weight, bias, flat_targets, weights, settings, transform, bool(with_entropy), bool(defer_checks),
        *depth,
    )  # fmt: skip
    return MRPLossSums(
        total=total,
        ce=ce,
        objective=obj,
        margin=margin,
        n_positions=(flat_targets != IGNORE_INDEX).sum(),
        n_gated=n_gated,
        n_correct=n_correct,
        entropy=entropy if with_entropy else None,
        penalty_fault=fault if defer_checks else None,
        depth=depth_term if depth else None,
    )
