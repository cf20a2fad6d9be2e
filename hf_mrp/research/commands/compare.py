"""`hf-mrp compare BEFORE_DIR AFTER_DIR --output_dir D`: the flip audit of two audit folders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...audit.compare import compare_dirs
from ...models import EMBEDDED_NAME, embedded_model_dir, load_tokenizer
from ...reporting.markdown import flip_summary_line
from ...storage.files import read_json
from ...storage.locks import owned_folder
from . import COMMANDS


@dataclass
class CompareArguments:
    """Two audits of the same positions (`hf-mrp audit` folders) and where to write their flip audit."""

    before_dir: str = field(metadata={"positional": True, "help": "audit folder of the model before refinement"})
    after_dir: str = field(metadata={"positional": True, "help": "audit folder of the model after refinement"})
    output_dir: str = field(metadata={"help": "folder for flip_audit.json, flip_audit.md and the plots"})
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "model id or folder whose tokenizer decodes tokens for the class breakdown; default: the "
            "model named in the audits' provenance when it is a local folder"
        },
    )


def make_parser(subparsers):
    return subparsers.add_parser(
        "compare", help=COMMANDS["compare"], description=COMMANDS["compare"], dataclass_types=(CompareArguments,)
    )


def main(args: CompareArguments) -> None:
    with owned_folder(args.output_dir):
        tokenizer = audit_tokenizer(args.tokenizer, args.before_dir)
        result = compare_dirs(args.before_dir, args.after_dir, args.output_dir, tokenizer=tokenizer)
    print(f"compared -> {args.output_dir}\n{flip_summary_line(result)}")


def audit_tokenizer(name: str | None, before_dir: str):
    """The tokenizer to decode target tokens: given, or the audited model's when it is the embedded one or a
    local folder (a Hub id is not loaded: the command works offline)."""
    if name is None:
        audit = Path(before_dir) / "audit.json"
        model = read_json(audit).get("provenance", {}).get("model") if audit.is_file() else None
        if model == EMBEDDED_NAME:
            name = str(embedded_model_dir())
        elif model and Path(model).is_dir():
            name = model
    return load_tokenizer(name) if name else None
