"""Turning a causal LM into what MRPTrainer trains: a LoRA-wrapped model, or the model itself."""

from __future__ import annotations

import logging

from torch import nn

from ..errors import MRPUserError
from ..models import decoder_layers, output_head

logger = logging.getLogger(__name__)


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Names of the linear modules inside the decoder blocks ('all-linear', spelled out: PEFT
    refuses the string form together with ``layers_to_transform``)."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in decoder_layers(model).named_modules()
        if isinstance(module, nn.Linear)
    }
    return sorted(names)


def lora_config_from_args(args, model: nn.Module):
    """A LoraConfig from MRPConfig's lora_* fields (only the chosen layers: ``layers_to_transform``)."""
    from peft import LoraConfig, TaskType

    targets = list(args.lora_target_modules)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=decoder_linear_names(model) if targets == ["all-linear"] else targets,
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
    if isinstance(model, PeftModel):
        return model
    if peft_config is None and not args.use_lora:
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
            f"{type(model).__name__} (e.g. q_proj v_proj) or 'all-linear'"
        ) from error
    if args.gradient_checkpointing:
        model.enable_input_require_grads()  # PEFT + checkpointing: inputs must carry grad for the adapters
    return model
