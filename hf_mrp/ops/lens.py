"""Lens math: each layer's next-token distribution compared with the final layer's, one chunk of positions at a
time, and the affine translators of a tuned lens (pure torch: no HF imports).

A lens maps layer l's hidden state h_l to logits z_l = T(W norm(f_l(h_l)) + b), where T is the model's own logit
transform (scale, soft cap), norm its final norm and f_l the identity (logit lens) or a trained affine map
h -> h + A_l h + c_l (tuned lens). The chunked pass holds three [chunk x V] float32 buffers: the layer's logits,
their exponentials, and the final layer's probabilities p_f, computed once per chunk and shared by every layer.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TypeVar

import torch
from torch import nn

from .margins import penalty_columns
from .objectives import TopK
from .precision import autocast_off
from .transform import IDENTITY, LogitTransform

LENS_STATISTICS = (
    "margin",
    "correct",
    "fisher_penalty",
    "margin_penalty",
    "kl_to_final",
    "agrees_with_final",
    "target_rank",
    "entropy",
    "target_logprob",
)
Key = TypeVar("Key", bound=Hashable)  # a lens layer's key: its index, or (lens, index) when two lenses share a pass


def _layer_chunk(
    logits: torch.Tensor,
    exp_buffer: torch.Tensor,
    final_probs: torch.Tensor,
    final_entropy: torch.Tensor,
    final_top1: torch.Tensor,
    targets: torch.Tensor,
    weight32: torch.Tensor,
    top_k: int,
    tau: float,
) -> dict[str, torch.Tensor]:
    """One layer's statistics on one chunk of transformed float32 ``logits`` (overwritten, as is ``exp_buffer``).

    KL(p_f || p_l) = sum p_f log p_f - sum p_f log p_l = log S_l - sum p_f (z_l - max_l) - H_f, with
    S_l = sum exp(z_l - max_l) (sum p_f = 1), so no log-probability buffer is needed. The target's rank is
    1 + the number of tokens whose logit is strictly above the target's (1 = top-1; ties count in its favour).
    """
    top_values, top_ids = logits.topk(top_k, dim=-1)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    rank = (logits > target_logit[:, None]).sum(-1) + 1
    margin_stats = {
        "margin": top_values[:, 0] - top_values[:, 1],
        "correct": top_ids[:, 0] == targets,
        **penalty_columns(
            TopK(top_values, top_ids, targets, target_logit, top_ids[:, 0] == targets, tau, weight32[top_ids])
        ),
    }
    peak = top_values[:, :1]
    shifted = logits.sub_(peak)
    exp = torch.exp(shifted, out=exp_buffer)
    total = exp.sum(-1)
    log_total = total.log()
    entropy = log_total - exp.mul_(shifted).sum(-1) / total  # H = log S - sum e (z - max) / S; exp is gone
    cross = torch.mul(final_probs, shifted, out=exp_buffer).sum(-1)  # sum p_f (z_l - max_l)
    return {
        **margin_stats,
        "kl_to_final": log_total - cross - final_entropy,
        "agrees_with_final": top_ids[:, 0] == final_top1,
        "target_rank": rank,
        "entropy": entropy,
        "target_logprob": target_logit - peak.squeeze(1) - log_total,
    }


def _final_chunk(
    logits: torch.Tensor, probs_out: torch.Tensor, scratch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p_f into ``probs_out``, H_f, top-1 id) of the final layer's transformed logits (``logits`` is overwritten).
    H_f = log S - sum p_f (z - max): the same arithmetic as a layer's cross term, so KL(final || final) is 0."""
    peak, top1 = logits.topk(1, dim=-1)  # topk, as a layer's top-1 is taken: ties resolve alike
    shifted = logits.sub_(peak)
    top1 = top1.squeeze(1)
    probs = torch.exp(shifted, out=probs_out)
    total = probs.sum(-1)
    probs.div_(total[:, None])
    entropy = total.log() - torch.mul(probs, shifted, out=scratch).sum(-1)
    return probs, entropy, top1


def _head_logits(
    states: torch.Tensor,
    weight32: torch.Tensor,
    bias32: torch.Tensor | None,
    transform: LogitTransform,
    out: torch.Tensor,
) -> torch.Tensor:
    """T(h W^T + b) in float32 into ``out``, exactly as ``decision_statistics`` computes it."""
    logits = torch.mm(states.float(), weight32.T, out=out)
    if bias32 is not None:
        logits.add_(bias32)
    return transform.cap_(logits)


@torch.no_grad()
def lens_statistics(
    final_hidden: torch.Tensor,
    layer_hidden: dict[Key, torch.Tensor],
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int = 1024,
    top_k: int = 5,
    tau: float = 1.0,
    transform: LogitTransform = IDENTITY,
) -> dict[Key, dict[str, torch.Tensor]]:
    """Per layer and position: margin, correctness, the MRP penalties (as ``decision_statistics`` computes them),
    KL(final || layer), top-1 agreement with the final layer, the target's rank, entropy and log-probability.

    ``final_hidden`` [N, d] are the final (normed) hidden states, ``layer_hidden[l]`` [N, d] layer l's states
    already through the lens (normed, translated). Chunks of ``chunk_size`` positions: the final layer's
    probabilities of a chunk are computed once and compared with every layer's.
    """
    if final_hidden.dim() != 2 or targets.dim() != 1 or final_hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected hidden [N, d] and targets [N], got {tuple(final_hidden.shape)} and {tuple(targets.shape)}"
        )
    with autocast_off(final_hidden, weight):  # float32 logits whatever the caller's autocast
        return _lens_statistics(final_hidden, layer_hidden, weight, targets, bias, chunk_size, top_k, tau, transform)


def _lens_statistics(
    final_hidden: torch.Tensor,
    layer_hidden: dict[Key, torch.Tensor],
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    chunk_size: int,
    top_k: int,
    tau: float,
    transform: LogitTransform,
) -> dict[Key, dict[str, torch.Tensor]]:
    weight32, bias32 = transform.scaled_head(weight, bias)
    n_positions = final_hidden.shape[0]
    rows = max(1, min(chunk_size, n_positions))
    logits_buffer = final_hidden.new_empty((rows, weight.shape[0]), dtype=torch.float32)
    exp_buffer, probs_buffer = torch.empty_like(logits_buffer), torch.empty_like(logits_buffer)
    parts: dict[Key, list[dict[str, torch.Tensor]]] = {layer: [] for layer in layer_hidden}
    for start in range(0, max(n_positions, 1), chunk_size):  # no position: one empty chunk, typed columns
        stop = min(start + chunk_size, n_positions)
        n = stop - start
        final_logits = _head_logits(final_hidden[start:stop], weight32, bias32, transform, logits_buffer[:n])
        final_probs, final_entropy, final_top1 = _final_chunk(final_logits, probs_buffer[:n], exp_buffer[:n])
        for layer, states in layer_hidden.items():
            logits = _head_logits(states[start:stop], weight32, bias32, transform, logits_buffer[:n])
            parts[layer].append(
                _layer_chunk(
                    logits,
                    exp_buffer[:n],
                    final_probs,
                    final_entropy,
                    final_top1,
                    targets[start:stop],
                    weight32,
                    top_k,
                    tau,
                )
            )
    return {
        layer: {key: torch.cat([chunk[key] for chunk in chunks]) for key in LENS_STATISTICS}
        for layer, chunks in parts.items()
    }


class AffineTranslators(nn.Module):
    """One affine map per lens layer, h -> h + h A_l^T + c_l, identity at initialization (A = 0, c = 0): before
    training the tuned lens is the logit lens. ``layers`` are the 0-based decoder layers it translates."""

    def __init__(self, layers: list[int], hidden_size: int):
        super().__init__()
        self.layers = [int(layer) for layer in layers]
        self.hidden_size = int(hidden_size)
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(hidden_size, hidden_size)) for _ in self.layers])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(hidden_size)) for _ in self.layers])

    def index(self, layer: int) -> int:
        return self.layers.index(int(layer))

    def translate(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s states through its translator, computed in float32 and returned in their dtype."""
        i = self.index(layer)
        h = hidden.float()
        return (h + torch.addmm(self.biases[i], h.reshape(-1, h.shape[-1]), self.weights[i].T).reshape(h.shape)).to(
            hidden.dtype
        )


def final_distribution(final_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_f, sum p_f log p_f) of [N, V] float32 final-layer logits: computed once, shared by every lens layer."""
    log_probs = torch.log_softmax(final_logits, dim=-1)
    probs = log_probs.exp()
    return probs, (probs * log_probs).sum(-1)


def kl_from_final(
    final_probs: torch.Tensor, final_neg_entropy: torch.Tensor, lens_logits: torch.Tensor
) -> torch.Tensor:
    """Per position KL(p_f || softmax(lens_logits)) = sum p_f log p_f - sum p_f log p_l, differentiable in
    ``lens_logits`` (the tuned lens' training loss; its gradient is p_l - p_f)."""
    return final_neg_entropy - (final_probs * torch.log_softmax(lens_logits, dim=-1)).sum(-1)


__all__ = ["AffineTranslators", "LENS_STATISTICS", "final_distribution", "kl_from_final", "lens_statistics"]
