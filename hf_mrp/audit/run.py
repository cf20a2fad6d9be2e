"""From arguments to a written audit: what `hf-mrp audit` and `examples/refine.py` call."""

from __future__ import annotations

import time

from ..arguments import AuditArguments, DataArguments, ModelArguments, provenance
from ..data import check_block_fits, load_blocks_from_arguments
from ..models import load_model_from_arguments
from .geometry import AuditResult, run_audit


def audit_from_arguments(model_args: ModelArguments, data_args: DataArguments, audit_args: AuditArguments) -> AuditResult:
    """Load the model and blocks, audit them and write the files to ``audit_args.output_dir``."""
    from accelerate import PartialState

    from ..reporting.ownership import is_main_process, owned_folder

    PartialState()  # joins the process group under torchrun / accelerate launch: each rank audits a shard
    with owned_folder(audit_args.output_dir, active=is_main_process()):
        model, tokenizer, name = load_model_from_arguments(model_args)
        check_block_fits(model, data_args.block_size)
        blocks = load_blocks_from_arguments(tokenizer, data_args)
        lens = None
        if audit_args.lens == "tuned":
            from .tuned_lens import load_tuned_lens

            lens = load_tuned_lens(audit_args.lens_path, device=next(model.parameters()).device)
        start = time.perf_counter()
        result = run_audit(
            model, blocks, output_dir=audit_args.output_dir, batch_size=audit_args.batch_size,
            chunk_size=audit_args.chunk_size, margin_dtype=audit_args.margin_dtype, layers=audit_args.layers,
            provenance=provenance(name, model_args, data_args, audit_args), lens=lens,
            lens_bootstrap=audit_args.lens_bootstrap,
        )
    result.seconds = time.perf_counter() - start
    return result
