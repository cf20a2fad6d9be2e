"""From the parsed flags to the plugin's objects: the one place the harness unpacks ``--model`` and ``--dataset``.

The plugin's loaders (`hf_mrp.models.load_model_and_tokenizer`, `hf_mrp.data.load_blocks`) take plain values; these
adapters read them off the argument dataclasses, so the plugin never imports the harness's arguments."""

from __future__ import annotations

from ..data import Blocks, load_blocks
from ..models import load_model_and_tokenizer
from .arguments import DataArguments, ModelArguments


def load_model_from_arguments(model_args: ModelArguments):
    """(model, tokenizer, name) from the ``--model`` flags: the one place commands unpack them."""
    return load_model_and_tokenizer(
        model_args.model,
        model_args.gguf_file,
        model_args.model_dtype,
        model_args.trust_remote_code,
        model_args.load_in_4bit,
    )


def load_blocks_from_arguments(tokenizer, data_args: DataArguments, extra_positions: int = 0) -> Blocks:
    """Blocks from the ``--dataset`` flags: the one place commands unpack them (``extra_positions``: a
    held-out audit taken on top of ``--max_positions``)."""
    return load_blocks(
        tokenizer,
        data_args.dataset,
        data_args.dataset_config,
        data_args.split,
        data_args.text_column,
        data_args.block_size,
        data_args.max_positions + extra_positions,
        data_args.encoding,
        data_args.encoding_errors,
    )
