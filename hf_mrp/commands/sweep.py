"""`hf-mrp sweep`: a dose-response sweep of MRP over objectives x lambdas x seeds, with controls.

Flags the sweep does not know pass through to every run (the refine flags): its parser hands them on unparsed,
and the command line is recorded with the results."""

from __future__ import annotations

import shlex

from ..errors import MRPUserError
from ..sweep import RESERVED_FLAGS, SweepArguments, run_sweep, summary_lines
from . import COMMANDS

FORWARDS_UNKNOWN_FLAGS = True
EPILOG = ("Every other flag (model, data, --audit_positions, --holdout, MRPConfig / TrainingArguments such as "
          "--max_steps, --lora_layers, --learning_rate, --block_size) passes through to every run, with the defaults "
          "of examples/refine.py; `hf-mrp refine --help` lists them.")


def make_parser(subparsers):
    return subparsers.add_parser("sweep", help=COMMANDS["sweep"], description=COMMANDS["sweep"], epilog=EPILOG,
                                 allow_abbrev=False, dataclass_types=(SweepArguments,))


def main(args: SweepArguments, refine_argv: list[str], argv: list[str]) -> None:
    for token in refine_argv:
        flag = token.split("=", 1)[0]
        if flag in RESERVED_FLAGS:
            raise MRPUserError(f"{flag} is set by the sweep for each run; use {RESERVED_FLAGS[flag]}")
    results = run_sweep(args, refine_argv, command="hf-mrp sweep " + shlex.join(argv))
    print(f"sweep -> {args.output_dir}  ({len(results['runs'])} runs, results.md / results.json)")
    print("\n".join(summary_lines(results)))
