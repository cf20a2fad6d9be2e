"""Elastic weight consolidation (Kirkpatrick et al. 2017) as an optional protection term of the MRP loss.

The seed paper pilots EWC against collateral damage; hf_mrp offers it beside the objective:
``mrp_ewc_lambda / 2 * sum_i F_i (theta_i - theta*_i)^2`` over the trained parameters, with theta* the weights
training starts from (under LoRA: the initial adapter) and F the diagonal Fisher of the cross-entropy at theta*,
estimated from ``mrp_ewc_batches`` training batches as the mean of the squared gradient of each batch's mean CE
(docs/spec.md says how that estimate departs from the per-example Fisher). It is logged as ``loss_ewc``.

The anchor and F live in memory only (twice the trained parameters); the trained weights must be whole on each
process, so FSDP and DeepSpeed are refused, and so is a resume (the anchor of the first run is not in the
checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from ..errors import MRPUserError


class EWCPenalty:
    """``lam / 2 * sum F (theta - theta*)^2`` over ``parameters``; call it for the term (a graph on them)."""

    def __init__(self, parameters: list[torch.nn.Parameter], fisher: list[torch.Tensor], lam: float):
        self.parameters, self.fisher, self.lam = parameters, fisher, lam
        self.anchor = [p.detach().clone() for p in parameters]

    def __call__(self) -> torch.Tensor:
        total = sum(
            ((p.float() - a.float()).square() * f).sum() for p, a, f in zip(self.parameters, self.anchor, self.fisher)
        )
        return 0.5 * self.lam * torch.as_tensor(total)


def check_ewc_applies(trainer, resume_from_checkpoint) -> None:
    """Refuse, before training, what EWC cannot do: sharded weights, and a resume (see the module docstring)."""
    if trainer.args.mrp_ewc_lambda <= 0:
        return
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        raise MRPUserError(
            "mrp_ewc_lambda needs the trained weights whole on every process; FSDP and DeepSpeed shard them: "
            "train with EWC on one process or under DDP, or set mrp_ewc_lambda 0"
        )
    if resume_from_checkpoint:
        raise MRPUserError(
            "mrp_ewc_lambda: a resumed run cannot restore the EWC anchor (the weights the first run started "
            "from are not saved in checkpoints); train again from the start, or resume with mrp_ewc_lambda 0"
        )


@contextlib.contextmanager
def _cross_entropy_only(trainer) -> Iterator[None]:
    """compute_loss with lambda 0 and the model in eval mode (no dropout), recording nothing (the mixin's
    ``_recording`` off: no logged sums or metrics): the Fisher batches are neither training nor evaluation batches."""
    args, model = trainer.args, trainer.model
    settings, training, recording = args.mrp_settings, model.training, trainer._recording
    args.__dict__["mrp_settings"] = dataclasses.replace(settings, lam=0.0)  # not through __setattr__: no re-check
    model.eval()
    trainer._recording = False
    try:
        yield
    finally:
        args.__dict__["mrp_settings"] = settings
        model.train(training)
        trainer._recording = recording


def estimate_penalty(trainer, model) -> EWCPenalty:
    """F from ``mrp_ewc_batches`` batches of the training data at the current weights; returns the penalty."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in parameters]
    batches = 0
    with _cross_entropy_only(trainer):
        for inputs in trainer.get_train_dataloader():
            if batches == trainer.args.mrp_ewc_batches:
                break
            model.zero_grad(set_to_none=True)
            loss = trainer.compute_loss(model, trainer._prepare_inputs(inputs))  # mean CE of the batch
            loss.backward()
            for f, p in zip(fisher, parameters):
                if p.grad is not None:
                    f += p.grad.detach().float().square()
            batches += 1
    model.zero_grad(set_to_none=True)
    return EWCPenalty(parameters, [f / max(batches, 1) for f in fisher], trainer.args.mrp_ewc_lambda)
