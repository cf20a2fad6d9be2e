"""`hf-mrp sweep`: a dose-response sweep of MRP over objectives x lambdas x seeds, with controls.

Flags the sweep does not know pass through to every run (the refine flags): its parser hands them on, they are
parsed once here as `hf-mrp refine` parses them (into the runs' shared RunArguments), and the command line is
recorded with the results."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from ...errors import MRPUserError
from ..parser import MRPArgumentParser
from ..sweep import RunArguments, SweepArguments, check_pass_through, run_sweep, summary_lines, with_audit_blocks
from . import COMMANDS
from .refine import parse_arguments as parse_refine_arguments

FORWARDS_UNKNOWN_FLAGS = True
EPILOG = (
    "Every other flag (model, data, --audit_positions, --holdout, MRPConfig / TrainingArguments such as "
    "--max_steps, --lora_layers, --learning_rate, --block_size) passes through to every run, with the defaults "
    "of examples/refine.py; `hf-mrp refine --help` lists them."
)


def make_parser(subparsers=None) -> MRPArgumentParser:
    """The sweep's parser (abbreviations off: --seed must not pass for --seeds); standalone without subparsers."""
    kwargs = dict(description=COMMANDS["sweep"], epilog=EPILOG, allow_abbrev=False, dataclass_types=(SweepArguments,))
    if subparsers is None:
        return MRPArgumentParser(prog="hf-mrp sweep", **kwargs)
    return subparsers.add_parser("sweep", help=COMMANDS["sweep"], **kwargs)


def parse_arguments(argv: Sequence[str]) -> tuple[SweepArguments, list[str]]:
    """(the sweep's own arguments, the flags passed through to every run)."""
    args, rest = make_parser().parse_args_into_dataclasses(args=list(argv), return_remaining_strings=True)
    check_pass_through(rest)
    return args, rest


def parse_pass_through(refine_argv: Sequence[str], audit_blocks: int) -> RunArguments:
    """The pass-through flags, parsed once as `hf-mrp refine` parses them (bad flags fail here, before any work,
    as the refine parser's one-line MRPUserError); without --audit_positions each run audits ``audit_blocks``
    whole blocks."""
    check_pass_through(refine_argv)
    shared = RunArguments(*parse_refine_arguments(list(refine_argv)))
    if any(token.split("=", 1)[0] == "--audit_positions" for token in refine_argv):
        return shared
    return with_audit_blocks(shared, audit_blocks)


def main(args: SweepArguments, refine_argv: list[str], argv: list[str]) -> None:
    shared = parse_pass_through(refine_argv, args.audit_blocks)
    results = run_sweep(args, shared, command="hf-mrp sweep " + shlex.join(argv))
    runs = results.aggregate.runs
    print(f"sweep -> {args.output_dir}  ({len(runs)} runs, results.md / results.json)")
    print("\n".join(summary_lines(results)))
    failed = [run.name for run in results.aggregate.failed_runs]
    if failed:
        raise MRPUserError(
            f"{len(failed)} of {len(runs) + len(failed)} runs failed: "
            f"{', '.join(failed)}; results.md lists them and why, the rows hold only the finished runs"
        )
