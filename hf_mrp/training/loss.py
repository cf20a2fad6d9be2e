"""The MRP loss of a model's forward, computed inside its output head (where W is whole).

One path for every trainer (`MRPTrainer`, `MRPSFTTrainer`): the model runs as usual (any wrapper,
any family, packed batches), its head's forward is replaced by the fused float32 loss of
`ops.mrp_loss_sums` over the shifted labels, applied through the model's own logit transform
(soft cap, scaling), float32 also under the Trainer's bf16 / fp16 autocast (unless the config opts into
``mrp_logits_precision="bfloat16"``), with the Trainer's ``label_smoothing_factor`` in closed form. The
model never forms [positions x vocab] logits, and the loss' gradients exist at the end of the forward, so
FSDP / ZeRO-3 need W only while the head runs.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import compiled_inner, compiled_module_type
from ..errors import MRPUserError
from ..models import carrier, check_token_ids, head_replaced, logit_transform, vocab_size
from ..ops import IGNORE_INDEX, MRPLossSums, MRPSettings, mrp_loss_sums
from .depth import captured_depth_states, lens_states


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside every wrapper the Trainer may hand ``compute_loss``: DDP, DataParallel, DeepSpeed's engine
    (whose ``config`` is DeepSpeed's dict, not the model's) and torch.compile's module; FSDP2 and PEFT keep the
    model's own class API. The forward still runs through the wrappers: only the head, config and vocabulary are
    read from the inner model."""
    parallel, compiled = _wrapper_types()
    while True:
        if isinstance(model, parallel):
            model = model.module  # type: ignore[assignment]  # torch types Module.__getattr__ as Tensor | Module
        elif isinstance(model, compiled):
            model = compiled_inner(model)
        else:
            return model


def _wrapper_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(wrappers holding ``.module``, wrappers holding ``._orig_mod``): DeepSpeedEngine and torch.compile's
    OptimizedModule only once their modules are imported (no such wrapper exists before, and a run without them
    never pays for importing them)."""
    engine = getattr(sys.modules.get("deepspeed"), "DeepSpeedEngine", None)
    optimized = compiled_module_type()
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel) + ((engine,) if isinstance(engine, type) else ())
    return parallel, (optimized,) if optimized is not None else ()


def forward_with_mrp_loss(
    model: nn.Module,
    inputs: dict,
    labels: torch.Tensor,
    settings: MRPSettings,
    *,
    position_weights: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    with_entropy: bool = False,
    with_logits: bool = False,
    host_checks: bool = True,
) -> tuple[MRPLossSums, Any]:
    """Run ``model(**inputs)`` with the MRP loss sums computed in its head; returns (sums, outputs).

    ``labels`` are aligned with ``input_ids`` (position t predicts ``labels[t + 1]``; -100 = ignored), or
    pass ``shift_labels`` already aligned with the hidden states (then ``labels`` may be None).
    ``position_weights`` weight the objective per label (aligned like ``labels``). ``sums.total`` carries the
    gradient and is tied to ``outputs.logits`` (zeros [batch, seq, 1], not logits), so backward starts at
    the model's output as FSDP expects. Divide ``sums.total`` by the number of items for the loss.
    ``with_entropy`` also sums the predictive entropy over the same positions (``sums.entropy``).
    ``with_logits`` makes the head also return its real logits (for predictions and metrics: the model's own
    [batch x seq x vocab] output, in its own dtype, as the plain Trainer sees it); then nothing is tied.
    Adapters that prepend virtual tokens (PEFT prompt / p-tuning) make the hidden states longer than the
    labels: as in PEFT's own forward, the labels are padded with ignored entries first and shifted after, so the
    last virtual position predicts the row's first label (see ``_aligned_with``).
    ``host_checks`` False (a training step after the first, whose data was checked on the host before training)
    skips the checks that read device values: token ids in the vocabulary, and the objective's finiteness, which is
    then handed back as ``sums.penalty_fault`` for the caller to read at its next check.
    """
    inner = unwrap(model)
    vocab = vocab_size(inner)
    if host_checks:
        check_token_ids(
            shift_labels if shift_labels is not None else labels[:, 1:], vocab, what="labels", ignore_index=IGNORE_INDEX
        )
    transform = logit_transform(inner)
    result: dict[str, MRPLossSums] = {}

    def compute(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        states, aligned_targets, aligned_weights = _aligned_with(hidden, labels, shift_labels, position_weights, vocab)
        depth = [u[:, : states.shape[1]] for u in lens_states(inner, settings, kept)] if kept else []
        result["sums"] = mrp_loss_sums(
            states, weight, aligned_targets, settings, bias=bias, position_weights=aligned_weights,
            transform=transform, with_entropy=with_entropy, defer_checks=not host_checks, depth_states=tuple(depth),
        )  # fmt: skip
        return F.linear(hidden, weight, bias) if with_logits else carrier(hidden, result["sums"].total)

    # kept: the target layers' outputs of a `layers` objective (else empty), filled before the head runs `compute`
    with head_replaced(inner, compute, check_ids=host_checks), captured_depth_states(inner, settings) as kept:
        outputs = model(**inputs, use_cache=False)
    sums = result["sums"]
    if not with_logits:
        sums.total = sums.total + outputs.logits.sum().to(sums.total.dtype)  # + exactly 0: see models.carrier
    return sums, outputs


def without_logits(outputs):
    """The model's outputs without the head's zeros placeholder (what a loss-only evaluation hands back)."""
    if isinstance(outputs, dict):
        return type(outputs)(**{key: value for key, value in outputs.items() if key != "logits"})
    return outputs


def _aligned_with(
    hidden: torch.Tensor,
    labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None,
    weights: torch.Tensor | None,
    vocab: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(states, targets, weights) aligned position by position: ``hidden[:, :-1]`` with ``labels[:, 1:]``, or
    ``hidden`` with ``shift_labels`` as given.

    A model that prepends k virtual tokens (PEFT prompt tuning, p-tuning) returns k more positions than the labels.
    PEFT pads the labels with k ignored entries *before* the model shifts them, so virtual position k-1 predicts
    the row's first label; padding after the shift would drop that label's loss (and its gradient, the one that
    reaches the prompt most directly). Pre-shifted ``shift_labels`` no longer hold the first label: they are padded
    as they are (PEFT pads only ``labels``), so then no virtual position carries loss.
    """
    if shift_labels is not None:
        states, targets = hidden, shift_labels
        extra = hidden.shape[1] - targets.shape[-1]
        if extra > 0 and targets.dim() == 2:
            targets = F.pad(targets, (extra, 0), value=IGNORE_INDEX)
            weights = None if weights is None else F.pad(weights, (extra, 0), value=0.0)
    else:
        assert labels is not None  # forward_with_mrp_loss takes labels or shift_labels
        extra = hidden.shape[1] - labels.shape[-1]
        if extra > 0 and labels.dim() == 2:
            check_token_ids(labels[:, :1], vocab, what="labels", ignore_index=IGNORE_INDEX)  # now a target too
            labels = F.pad(labels, (extra, 0), value=IGNORE_INDEX)
            weights = None if weights is None else F.pad(weights, (extra, 0), value=0.0)
        states, targets = hidden[:, :-1], labels[:, 1:]
        weights = None if weights is None else weights[:, 1:]
    if states.shape[1] < targets.shape[-1] and targets.dim() == 2:
        raise MRPUserError(
            f"the model returned {hidden.shape[1]} positions for labels of {targets.shape[-1] + (shift_labels is None)}"
            ": labels and input_ids must have the same length (pad both, or let the collator build labels)"
        )
    return states, targets, weights


def router_aux_loss(model: nn.Module, outputs) -> torch.Tensor | None:
    """coef * the router's load-balancing loss, as MoE models add it to their own loss (when
    ``output_router_logits`` is on); None for dense models."""
    aux = getattr(outputs, "aux_loss", None)
    coef = getattr(getattr(unwrap(model), "config", None), "router_aux_loss_coef", None)
    if aux is None or coef is None:
        return None
    return coef * aux
