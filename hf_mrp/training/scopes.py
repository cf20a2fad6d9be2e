"""Trainable scopes beside LoRA: which of the model's own weights a run trains, as the paper's released code
offers them (mellowmarshall/mrp-paper, src/mrp/training.py `_apply_trainable_scope`; docs/spec.md).

``lora`` (the default) trains a PEFT adapter and no base weight. The others train base weights in place and
freeze the rest: ``last_n_blocks`` (the last ``trainable_last_n`` decoder blocks and the final norm, as released),
``final_norm``, ``embeddings`` (the input embeddings), ``lm_head`` (the output head W) and ``full`` (every weight
the model leaves trainable: a model whose weights the caller froze keeps them frozen).
With tied embeddings (SmolLM2 ties them), ``embeddings`` and ``lm_head`` select the same tensor.
"""

from __future__ import annotations

from torch import nn

from ..errors import MRPUserError
from ..models import decoder_layers, final_norm

TRAINABLE_SCOPES = ("lora", "last_n_blocks", "final_norm", "embeddings", "lm_head", "full")


def _scope_modules(model: nn.Module, scope: str, last_n: int) -> list[nn.Module]:
    if scope == "full":
        return [model]
    if scope == "final_norm":
        return [final_norm(model)]
    if scope == "embeddings":
        return [model.get_input_embeddings()]  # type: ignore[operator]
    if scope == "lm_head":
        return [model.get_output_embeddings()]  # type: ignore[operator]
    layers = decoder_layers(model)
    if not 1 <= last_n <= len(layers):
        raise MRPUserError(
            f"trainable_last_n {last_n} is out of range: the model has {len(layers)} decoder blocks; pass "
            f"--trainable_last_n between 1 and {len(layers)}"
        )
    return [*layers[len(layers) - last_n :], final_norm(model)]


def apply_trainable_scope(model: nn.Module, scope: str, last_n: int = 1) -> list[str]:
    """Freeze every weight of ``model``, then unfreeze those of ``scope``; returns the trained parameters' names.

    Args:
        model: the causal LM (not yet wrapped by PEFT or an engine).
        scope: one of TRAINABLE_SCOPES other than ``lora``.
        last_n: the decoder blocks ``last_n_blocks`` trains (counted from the last).
    """
    if scope not in TRAINABLE_SCOPES or scope == "lora":
        raise MRPUserError(f"trainable_scope {scope!r} trains no base weight; pick one of {TRAINABLE_SCOPES[1:]}")
    selected = {id(p) for module in _scope_modules(model, scope, last_n) for p in module.parameters()}
    names = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(id(parameter) in selected)
        if id(parameter) in selected:
            names.append(name)
    if not names:
        raise MRPUserError(f"trainable_scope {scope!r} selects no weight of {type(model).__name__}")
    return names
