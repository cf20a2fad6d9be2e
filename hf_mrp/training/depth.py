"""The target layers' states of a ``layers`` objective (the released ``depth`` / ``combined``), captured during the
model's own forward and handed to the fused loss inside the head's replaced forward.

Forward hooks on the decoder blocks of ``mrp_target_layers`` keep each block's output (the tensor the next block
reads, so autograd reaches the layers below from it; transformers checkpoints a block's ``forward``, never its
hooks). When the head runs (where W is whole, also under FSDP2 / ZeRO-3), each kept state goes through the lens
``mrp_depth_lens`` picks, with ordinary autograd over [positions x d] only: ``raw`` leaves it as is (the released
h_l W^T), ``logit`` applies the model's final norm, ``tuned`` a frozen `hf-mrp lens train` translator and then the
norm (as the audit's lenses do). The fused loss takes the results as inputs of its autograd Function and hands
their gradients back, so the norm's weight and every layer below are trained by the depth term too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..audit.tuned_lens import load_tuned_lens
from ..errors import MRPUserError
from ..models import decoder_layers, final_norm
from ..ops import MRPSettings
from ..ops.lens import AffineTranslators


def target_layers(model: nn.Module, settings: MRPSettings) -> tuple[int, ...]:
    """``mrp_target_layers`` checked against the model: decoder blocks 0..L-2 (L-1, the final layer, is the
    objective's own)."""
    indices, n = settings.layer_indices, len(decoder_layers(model))
    bad = [i for i in indices if i > n - 2]
    if bad:
        raise MRPUserError(
            f"mrp_target_layers {settings.target_layers!r}: layer {bad[0]} is out of range for "
            f"{type(model).__name__}, whose decoder layers are 0..{n - 1} (the final one, {n - 1}, is the objective's "
            f"own); choose layers in 0..{n - 2}"
        )
    return indices


def check_depth(model: nn.Module, settings: MRPSettings) -> None:
    """Refuse, before training, target layers the model lacks, a tuned lens that does not fit it, and target layers
    that no trained parameter is below (the depth term would train nothing)."""
    if settings.record.layers:
        _check_depth_trains(model, settings, target_layers(model, settings))
        if settings.depth_lens == "tuned":
            _translators(model, settings)


def _check_depth_trains(model: nn.Module, settings: MRPSettings, layers: tuple[int, ...]) -> None:
    """A target layer's state depends on the blocks up to it (and the embeddings; through the lens on the norm and
    W): when every trained parameter lies in decoder blocks above the highest target layer (LoRA on layers 20-29
    with target layers 14-16), the depth term has no gradient to give and the run would silently be its control."""
    blocks = decoder_layers(model)
    block_of = {id(p): index for index, block in enumerate(blocks) for p in block.parameters()}
    trained = [block_of.get(id(p), -1) for p in model.parameters() if p.requires_grad]  # -1: outside the blocks
    if trained and min(trained) > max(layers):
        raise MRPUserError(
            f"mrp_objective {settings.record.name!r}: mrp_target_layers {settings.target_layers!r} lie below every "
            f"trained parameter (the lowest trained decoder layer is {min(trained)}), so the depth term would train "
            f"nothing; choose target layers at or above {min(trained)}, or train layers up to {max(layers)} (e.g. "
            f"lora_layers '{min(layers)}-{len(blocks) - 1}')"
        )


def _translators(model: nn.Module, settings: MRPSettings) -> AffineTranslators:
    """The frozen translators of ``mrp_depth_lens_path``, loaded once per model and path, checked to cover the
    target layers at the model's width."""
    path = str(settings.depth_lens_path)
    cached = getattr(model, "_hf_mrp_depth_lens", None)
    if cached is not None and cached[0] == path:
        return cached[1]
    try:
        translators = load_tuned_lens(path).translators
    except MRPUserError as error:
        raise MRPUserError(f"mrp_depth_lens_path {path}: {error}") from None
    width = int(getattr(getattr(model, "config", None), "hidden_size", translators.hidden_size))
    missing = [i for i in target_layers(model, settings) if i not in translators.layers]
    if missing or translators.hidden_size != width:
        raise MRPUserError(
            f"mrp_depth_lens_path {path}: its tuned lens translates layers {translators.layers} of width "
            f"{translators.hidden_size}, not mrp_target_layers {settings.target_layers!r} of this model (width "
            f"{width}); train one for them (`hf-mrp lens train --layers {settings.target_layers}`) or use "
            "mrp_depth_lens 'logit'"
        )
    translators.requires_grad_(False)
    object.__setattr__(model, "_hf_mrp_depth_lens", (path, translators))
    return translators


@contextmanager
def captured_depth_states(model: nn.Module, settings: MRPSettings) -> Iterator[dict[int, torch.Tensor]]:
    """While the block runs the model's forward, keep the target layers' outputs: the yielded dict (layer -> its
    output) is full by the time the head runs (empty, no hook, unless the objective reads layers with lambda > 0).
    `lens_states` turns them into the fused loss' inputs."""
    kept: dict[int, torch.Tensor] = {}
    if not (settings.record.layers and settings.lam != 0.0):
        yield kept
        return
    blocks = decoder_layers(model)
    indices = target_layers(model, settings)

    def keep(index: int):
        def hook(module, args, output):
            kept[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [blocks[i].register_forward_hook(keep(i)) for i in indices]
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


def lens_states(model: nn.Module, settings: MRPSettings, kept: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """The target layers' kept outputs through ``mrp_depth_lens`` (raw, the final norm, or a tuned translator and
    the norm), differentiable."""
    indices = target_layers(model, settings)
    states = [kept[i] for i in indices]
    if settings.depth_lens == "raw":
        return states
    norm = final_norm(model)
    if settings.depth_lens == "tuned":
        translators = _translators(model, settings).to(states[0].device)
        states = [translators.translate(i, u) for i, u in zip(indices, states)]
    return [norm(u) for u in states]
