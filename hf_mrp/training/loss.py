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

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MRPUserError
from ..models import carrier, check_token_ids, head_replaced, logit_transform, output_head, vocab_size
from ..ops import MRPLossSums, mrp_loss_sums

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MRPLossSettings:
    """What the loss needs from a config (`MRPConfig`, `MRPSFTConfig`)."""

    objective: str = "fisher"
    lam: float = 0.0
    tau: float = 1.0
    top_k: int = 5
    chunk_size: int = 1024
    normalization: str = "gated"
    label_smoothing: float = 0.0
    logits_precision: str = "float32"

    @classmethod
    def from_config(cls, args) -> "MRPLossSettings":
        return cls(args.mrp_objective, float(args.mrp_lambda), float(args.mrp_margin_threshold), int(args.mrp_top_k),
                   int(args.mrp_chunk_size), args.mrp_margin_normalization, float(args.label_smoothing_factor),
                   args.mrp_logits_precision)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel wrappers (FSDP2 and PEFT keep the model's own class API)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def forward_with_mrp_loss(
    model: nn.Module,
    inputs: dict,
    labels: torch.Tensor,
    settings: MRPLossSettings,
    *,
    position_weights: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    with_entropy: bool = False,
) -> tuple[MRPLossSums, object]:
    """Run ``model(**inputs)`` with the MRP loss sums computed in its head; returns (sums, outputs).

    ``labels`` are aligned with ``input_ids`` (position t predicts ``labels[t + 1]``; -100 = ignored), or
    pass ``shift_labels`` already aligned with the hidden states (then ``labels`` may be None).
    ``position_weights`` weight the objective per label (aligned like ``labels``). ``sums.total`` carries the
    gradient and is tied to ``outputs.logits`` (zeros [batch, seq, 1], not logits), so backward starts at
    the model's output as FSDP expects. Divide ``sums.total`` by the number of items for the loss.
    ``with_entropy`` also sums the predictive entropy over the same positions (``sums.entropy``).
    """
    inner = unwrap(model)
    _refuse_trained_head_under_zero3(output_head(inner)[0])
    targets = shift_labels if shift_labels is not None else labels[:, 1:]
    weights = None if position_weights is None else (position_weights if shift_labels is not None
                                                      else position_weights[:, 1:])
    check_token_ids(targets, vocab_size(inner), what="labels", ignore_index=IGNORE_INDEX)
    transform = logit_transform(inner)
    result: dict[str, MRPLossSums] = {}

    def compute(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        states = hidden if shift_labels is not None else hidden[:, :-1]
        result["sums"] = mrp_loss_sums(
            states, weight, targets, bias=bias, objective=settings.objective, lam=settings.lam, tau=settings.tau,
            top_k=settings.top_k, chunk_size=settings.chunk_size, position_weights=weights, transform=transform,
            normalization=settings.normalization, with_entropy=with_entropy,
            label_smoothing=settings.label_smoothing, precision=settings.logits_precision,
        )
        return carrier(hidden)

    with head_replaced(inner, compute):
        outputs = model(**inputs, use_cache=False)
    sums = result["sums"]
    sums.total = sums.total + outputs.logits.sum().to(sums.total.dtype)  # + exactly 0: see models.carrier
    return sums, outputs


def _refuse_trained_head_under_zero3(weight: torch.Tensor) -> None:
    """DeepSpeed ZeRO-3 partitions W (``ds_id`` marks its parameters); its gradient, made during our forward,
    would bypass ZeRO-3's gather/partition hooks, so a trained head is refused there (FSDP2 handles it)."""
    if weight.requires_grad and hasattr(weight, "ds_id"):
        raise MRPUserError(
            "the output head (lm_head) trains, and DeepSpeed ZeRO-3 partitions it: the fused MRP loss cannot hand "
            "ZeRO-3 that gradient. Train LoRA adapters on the decoder layers (the default), use ZeRO-2, or shard "
            "with FSDP2 (examples/accelerate/fsdp.yaml), which supports a trained head"
        )


def router_aux_loss(model: nn.Module, outputs) -> torch.Tensor | None:
    """coef * the router's load-balancing loss, as MoE models add it to their own loss (when
    ``output_router_logits`` is on); None for dense models."""
    aux = getattr(outputs, "aux_loss", None)
    coef = getattr(getattr(unwrap(model), "config", None), "router_aux_loss_coef", None)
    if aux is None or coef is None:
        return None
    return coef * aux
