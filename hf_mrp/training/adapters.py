"""Turning a causal LM into what MRPTrainer trains: a LoRA-wrapped model, or the model itself."""

from __future__ import annotations

import logging

from torch import nn

from ..compat import peft_accepts_target, peft_all_linear
from ..errors import MRPUserError
from ..models import decoder_layers, output_head
from .scopes import apply_trainable_scope

logger = logging.getLogger(__name__)


def decoder_linear_names(model: nn.Module) -> list[str]:
    """'all-linear' as PEFT resolves it (nn.Linear and transformers' Conv1D, the output head excluded), kept to
    the decoder blocks, minus the modules PEFT refuses for the family (Mamba's out_proj, conv1d). Spelled out
    because PEFT refuses the string form together with ``layers_to_transform``."""
    from peft import LoraConfig, TaskType

    probe = peft_all_linear(LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules="all-linear"), model)
    inside = {id(module) for module in decoder_layers(model).modules()}
    modules = dict(model.named_modules())
    names = {name.rsplit(".", 1)[-1] for name in probe.target_modules if id(modules.get(name)) in inside}
    return sorted(name for name in names if peft_accepts_target(probe, model, name))


def _check_targets_exist(targets: list[str], model: nn.Module) -> None:
    """Every listed target must name a module of the decoder blocks: a typo is refused, listing what exists."""
    present = {name.rsplit(".", 1)[-1] for name, _ in decoder_layers(model).named_modules()}
    missing = [target for target in targets if target not in present]
    if missing:
        raise MRPUserError(
            f"lora_target_modules {', '.join(missing)} match no module of {type(model).__name__}'s decoder layers; "
            f"its adaptable modules are: {' '.join(decoder_linear_names(model)) or 'none'} (or pass 'all-linear')"
        )


def lora_config_from_args(args, model: nn.Module):
    """A LoraConfig from MRPConfig's lora_* fields (only the chosen layers: ``layers_to_transform``)."""
    from peft import LoraConfig, TaskType

    targets = list(args.lora_target_modules)
    if targets == ["all-linear"]:
        targets = decoder_linear_names(model)
        if not targets:
            raise MRPUserError(
                f"{type(model).__name__} has no linear module PEFT can adapt in its decoder layers; pass a "
                "peft_config of your own, or use_lora=False to train the model's weights"
            )
    else:
        _check_targets_exist(targets, model)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        layers_to_transform=args.lora_layer_indices(len(decoder_layers(model))),
    )


def _check_trainable(model: nn.Module) -> None:
    quantizer = getattr(model, "hf_quantizer", None)
    method = str(getattr(getattr(quantizer, "quantization_config", None), "quant_method", ""))
    if "gguf" in method.lower():
        raise MRPUserError(
            "this model was loaded from GGUF as quantized weights, which cannot be trained; load it with "
            "quantization_config=GgufConfig(dequantize=True) (hf_mrp.load_model_and_tokenizer does)"
        )


def prepare_model(model: nn.Module, args, peft_config=None) -> nn.Module:
    """Wrap ``model`` with PEFT when an adapter is asked for; check layers and targets before training."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    output_head(model)
    _check_trainable(model)
    scope = getattr(args, "trainable_scope", "lora")
    if scope not in ("lora", "full") and (peft_config is not None or isinstance(model, PeftModel)):
        raise MRPUserError(
            f"trainable_scope {scope!r} trains the model's own weights, but an adapter was given (a peft_config or "
            "a PeftModel); drop one of them (trainable_scope 'lora' trains the adapter)"
        )
    if isinstance(model, PeftModel):
        return model
    if peft_config is None and not args.use_lora:
        if scope not in ("lora", "full"):  # 'full': the weights the model leaves trainable, as given
            apply_trainable_scope(model, scope, getattr(args, "trainable_last_n", 1))
        return model
    n_layers = len(decoder_layers(model))
    config = peft_config if peft_config is not None else lora_config_from_args(args, model)
    layers = getattr(config, "layers_to_transform", None)
    if layers is not None:
        for index in [layers] if isinstance(layers, int) else layers:
            if not 0 <= index < n_layers:
                raise MRPUserError(
                    f"LoRA layer {index} is out of range: the model has {n_layers} layers (0..{n_layers - 1}); "
                    "fix lora_layers / layers_to_transform"
                )
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    try:
        model = get_peft_model(model, config)
    except ValueError as error:
        raise MRPUserError(
            f"could not attach LoRA: {str(error).splitlines()[0]}; pass lora_target_modules that exist in "
            f"{type(model).__name__} ({' '.join(decoder_linear_names(model)) or 'none found'}) or 'all-linear'"
        ) from error
    if args.gradient_checkpointing:
        # PEFT + checkpointing: inputs must carry grad for the adapters (ignore: torch types a Module attribute
        # as Tensor | Module, so no method of a model is callable to mypy)
        model.enable_input_require_grads()  # type: ignore[operator]
    return model
