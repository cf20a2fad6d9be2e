"""`hf-mrp refine` (and `python examples/refine.py`): audit, refine with MRPTrainer, audit again, compare."""

from __future__ import annotations

from ..arguments import DataArguments, ModelArguments
from ..parser import MRPArgumentParser
from ..presets import install_presets
from ..refine import DEFAULTS, RefineArguments, refine
from ..reporting.markdown import flip_summary_line
from ..training import MRPConfig
from . import COMMANDS

ARGUMENT_TYPES = (ModelArguments, DataArguments, RefineArguments, MRPConfig)


def make_parser(subparsers=None) -> MRPArgumentParser:
    """The refine parser, with examples/refine.py's defaults; a standalone one when ``subparsers`` is None
    (what the sweep parses each run's flags with)."""
    if subparsers is None:
        parser = MRPArgumentParser(ARGUMENT_TYPES, prog="hf-mrp refine")
    else:
        parser = subparsers.add_parser("refine", help=COMMANDS["refine"], description=COMMANDS["refine"],
                                       dataclass_types=ARGUMENT_TYPES)
    parser.set_defaults(**DEFAULTS)
    return install_presets(parser)  # --preset paper: the paper's released settings as defaults


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, RefineArguments, MRPConfig]:
    return tuple(make_parser().parse_args_into_dataclasses(args=argv))


def main(model_args: ModelArguments, data_args: DataArguments, refine_args: RefineArguments, config: MRPConfig) -> None:
    comparison = refine(model_args, data_args, refine_args, config)
    if comparison:
        print(f"refined -> {config.output_dir}\n{flip_summary_line(comparison)}")
