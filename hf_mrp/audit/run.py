"""From arguments to a written audit: what `hf-mrp audit` and `examples/refine.py` call."""

from __future__ import annotations

import dataclasses
import time

from ..arguments import AuditArguments, DataArguments, ModelArguments
from ..data import check_block_fits, load_blocks
from ..models import load_model_and_tokenizer
from .geometry import AuditResult, run_audit


def provenance(model_name: str, *argument_groups) -> dict:
    """Model name, every argument, and package versions: enough to rerun the same audit."""
    import torch
    import transformers

    from .. import __version__

    arguments = {}
    for group in argument_groups:
        arguments.update(dataclasses.asdict(group))
    return {
        "model": model_name,
        "arguments": arguments,
        "versions": {"hf_mrp": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }


def audit_from_arguments(model_args: ModelArguments, data_args: DataArguments, audit_args: AuditArguments) -> AuditResult:
    """Load the model and blocks, audit them and write the files to ``audit_args.output_dir``."""
    from accelerate import PartialState

    from ..reporting.ownership import is_main_process, owned_folder

    PartialState()  # joins the process group under torchrun / accelerate launch: each rank audits a shard
    with owned_folder(audit_args.output_dir, active=is_main_process()):
        model, tokenizer, name = load_model_and_tokenizer(
            model_args.model, model_args.gguf_file, model_args.model_dtype, model_args.trust_remote_code,
            model_args.load_in_4bit,
        )
        check_block_fits(model, data_args.block_size)
        blocks = load_blocks(
            tokenizer, data_args.dataset, data_args.dataset_config, data_args.split, data_args.text_column,
            data_args.block_size, data_args.max_positions, data_args.encoding, data_args.encoding_errors,
        )
        start = time.perf_counter()
        result = run_audit(
            model, blocks, output_dir=audit_args.output_dir, batch_size=audit_args.batch_size,
            chunk_size=audit_args.chunk_size, margin_dtype=audit_args.margin_dtype, layers=audit_args.layers,
            provenance=provenance(name, model_args, data_args, audit_args),
        )
    result.seconds = time.perf_counter() - start
    return result
