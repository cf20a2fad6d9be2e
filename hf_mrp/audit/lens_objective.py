"""What the tuned lens' translators are fitted to: KL(final || layer) through each translator, the final norm, W
and the model's logit transform, on hidden states read once (``collect_lens_inputs``), backpropagated chunk by
chunk so that no [positions x vocab] tensor of a whole step exists.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import Blocks
from ..models import carrier, final_norm, logit_transform, output_head
from ..ops.lens import AffineTranslators, final_distribution, kl_from_final
from .collect import head_forward


@torch.no_grad()
def collect_lens_inputs(
    model: torch.nn.Module,
    blocks: Blocks,
    layers: list[int],
    batch_size: int = 8,
) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor]:
    """(final normed hidden states [N, d], each layer's raw hidden states {l: [N, d]}, targets [N]) at the
    evaluated positions of ``blocks``, in block order, from forwards whose head is replaced (no logits formed)."""
    device = next(model.parameters()).device
    mask = blocks.position_mask()
    finals: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    per_layer: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(blocks.input_ids), batch_size):
            ids = torch.as_tensor(blocks.input_ids[start : start + batch_size], device=device)
            batch_mask = torch.as_tensor(mask[start : start + batch_size], device=device)
            captured: dict[int, torch.Tensor] = {}

            def compute(hidden, weight, bias, batch_mask=batch_mask):  # bound now: called within this iteration
                finals.append(hidden[:, :-1][batch_mask])
                return carrier(hidden)

            head_forward(model, ids, compute, captured, layers)
            for layer in layers:
                per_layer[layer].append(captured[layer][:, :-1][batch_mask])
            targets.append(ids[:, 1:][batch_mask])
    finally:
        model.train(was_training)
    return torch.cat(finals), {layer: torch.cat(parts) for layer, parts in per_layer.items()}, torch.cat(targets)


def step_positions(step: int, n_positions: int, batch_positions: int, seed: int) -> np.ndarray:
    """The positions of training step ``step``: drawn without replacement from a generator seeded by (seed, step),
    so a resumed run draws what an uninterrupted one would."""
    rng = np.random.default_rng([seed, step])
    return np.sort(rng.choice(n_positions, size=min(batch_positions, n_positions), replace=False))


class LensObjective:
    """KL(final || layer) through the translators, the final norm, W and the model's logit transform, summed over
    a step's positions (those of this rank) and divided by the step's batch size; backpropagated chunk by chunk
    and layer by layer, so at most a few [chunk x V] float32 tensors exist at once."""

    def __init__(
        self,
        model: torch.nn.Module,
        translators: AffineTranslators,
        final_hidden: torch.Tensor,
        layer_hidden: dict[int, torch.Tensor],
        chunk_size: int,
    ):
        self.norm = final_norm(model)
        self.transform = logit_transform(model)
        weight, bias = output_head(model)
        weight32, bias32 = self.transform.scaled_head(weight, bias)
        self.weight32, self.bias32 = weight32.detach(), None if bias32 is None else bias32.detach()
        self.translators, self.final_hidden, self.layer_hidden = translators, final_hidden, layer_hidden
        self.chunk_size = chunk_size

    def _logits(self, states: torch.Tensor) -> torch.Tensor:
        raw = torch.nn.functional.linear(states.float(), self.weight32, self.bias32)
        cap = self.transform.softcap
        return raw if cap is None else cap * torch.tanh(raw / cap)

    def backward(self, index: np.ndarray, batch_positions: int) -> dict[int, float]:
        """Accumulate the gradients of this rank's share of a step; returns each layer's summed KL."""
        sums = {layer: 0.0 for layer in self.translators.layers}
        index_t = torch.as_tensor(index, device=self.final_hidden.device)
        for start in range(0, len(index), self.chunk_size):
            chunk = index_t[start : start + self.chunk_size]
            with torch.no_grad():
                probs, neg_entropy = final_distribution(self._logits(self.final_hidden[chunk]))
            for layer in self.translators.layers:
                states = self.norm(self.translators.translate(layer, self.layer_hidden[layer][chunk]))
                kl = kl_from_final(probs, neg_entropy, self._logits(states)).sum()
                (kl / batch_positions).backward()
                sums[layer] += float(kl.detach())
        return sums
