"""`hf-mrp downstream`: downstream invariance through lm-evaluation-harness, base vs base + adapter."""

from __future__ import annotations

import logging
from pathlib import Path

from ..arguments import ModelArguments
from ..downstream import DownstreamArguments, downstream_from_arguments, summary_line
from . import COMMANDS


def make_parser(subparsers):
    return subparsers.add_parser(
        "downstream",
        help=COMMANDS["downstream"],
        description=COMMANDS["downstream"],
        dataclass_types=(ModelArguments, DownstreamArguments),
    )


def main(model_args: ModelArguments, downstream_args: DownstreamArguments) -> None:
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-request INFO/WARNING lines drown the summary
    report = downstream_from_arguments(model_args, downstream_args)
    print(f"{summary_line(report)} -> {Path(downstream_args.output_dir) / 'downstream.json'}")
