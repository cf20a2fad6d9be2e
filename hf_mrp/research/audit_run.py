"""From arguments to a written audit: what `hf-mrp audit` and `examples/refine.py` call.

The output folder is owned like a refine folder: a folder holding a finished audit (audit.json) is only replaced
with ``--overwrite_output_dir true``, and the audit's files appear together: they are written into a staging
folder beside the output folder, which then takes its place in one atomic exchange (folders.swapped_folder). A kill
at any moment leaves the old audit whole or the new one whole, never a mix of the two.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..audit.audit_files import AUDIT_MARKER
from ..audit.geometry import AuditResult, run_audit
from ..data import check_block_fits
from ..data.sources import check_data_flags_apply
from ..errors import MRPUserError
from .arguments import AuditArguments, DataArguments, ModelArguments, audit_options, provenance
from .loading import load_blocks_from_arguments, load_model_from_arguments


def holds_finished_audit(folder: str | Path) -> bool:
    return (Path(folder) / AUDIT_MARKER).is_file()


def check_may_write_audit(folder: Path, overwrite: bool) -> None:
    """Refuse to write an audit over a finished one (or over a finished refine run) unless asked to."""
    from .run_folders import check_may_write

    check_may_write(folder, overwrite, None)
    if holds_finished_audit(folder) and not overwrite:
        raise MRPUserError(
            f"output_dir {folder} holds a finished audit ({AUDIT_MARKER}, positions.parquet, blocks.npy); nothing was "
            f"changed. Pass another --output_dir, or --overwrite_output_dir true to replace that audit"
        )


def _lens_path(audit_args: AuditArguments) -> str:
    """--lens_path, which AuditArguments requires with --lens tuned."""
    if audit_args.lens_path is None:
        raise MRPUserError("--lens tuned needs --lens_path, the folder written by `hf-mrp lens train`")
    return audit_args.lens_path


def audit_from_arguments(
    model_args: ModelArguments, data_args: DataArguments, audit_args: AuditArguments
) -> AuditResult:
    """Load the model and blocks, audit them and write the files to ``audit_args.output_dir``."""
    from accelerate import PartialState

    from ..storage.files import ensure_output_dir
    from ..storage.locks import is_main_process, owned_folder

    PartialState()  # joins the process group under torchrun / accelerate launch: each rank audits a shard
    main = is_main_process()
    folder = ensure_output_dir(audit_args.output_dir)
    with owned_folder(folder, active=main):
        check_may_write_audit(folder, audit_args.overwrite_output_dir)
        check_data_flags_apply(data_args)
        model, tokenizer, name = load_model_from_arguments(model_args)
        check_block_fits(model, data_args.block_size)
        blocks = load_blocks_from_arguments(tokenizer, data_args)
        lens = None
        if audit_args.lens == "tuned":
            from ..audit.tuned_lens import load_tuned_lens

            lens = load_tuned_lens(_lens_path(audit_args), device=next(model.parameters()).device)
        origin = provenance(name, model_args, data_args, audit_args)
        start = time.perf_counter()
        result = run_audit(  # staged beside the folder, swapped in whole
            model,
            blocks,
            output_dir=folder,
            chunk_size=audit_args.chunk_size,
            margin_dtype=audit_args.margin_dtype,
            provenance=origin,
            lens=lens,
            lens_bootstrap=audit_args.lens_bootstrap,
            **audit_options(audit_args),
        )
    result.seconds = time.perf_counter() - start
    return result
