"""Causal LMs: loading them (loading.py) and working at their output head (head.py)."""

from .head import (
    carrier,
    check_token_ids,
    decoder_layers,
    final_norm,
    head_replaced,
    logit_transform,
    output_head,
    probe_logit_transform,
    vocab_size,
)
from .loading import (
    DTYPES,
    EMBEDDED_GGUF,
    EMBEDDED_NAME,
    EMBEDDED_PACKAGE,
    INSTALL_HINT,
    cache_root,
    embedded_gguf_path,
    embedded_model_dir,
    four_bit_config,
    load_model_and_tokenizer,
    load_model_from_arguments,
    load_tokenizer,
    require_bitsandbytes,
    resolve_dtype,
)

__all__ = [
    "DTYPES", "EMBEDDED_GGUF", "EMBEDDED_NAME", "EMBEDDED_PACKAGE", "INSTALL_HINT", "cache_root", "carrier",
    "check_token_ids", "decoder_layers", "embedded_gguf_path", "embedded_model_dir", "final_norm", "four_bit_config",
    "head_replaced", "load_model_and_tokenizer", "load_model_from_arguments", "load_tokenizer", "logit_transform",
    "output_head", "probe_logit_transform", "require_bitsandbytes", "resolve_dtype", "vocab_size",
]
