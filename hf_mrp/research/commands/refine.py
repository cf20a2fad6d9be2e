"""`hf-mrp refine` (and `python examples/refine.py`): audit, refine with MRPTrainer, audit again, compare."""

from __future__ import annotations

from pathlib import Path

from ...compat import set_help
from ...errors import MRPUserError
from ...ops.objectives import objectives_help
from ...reporting.markdown import flip_summary_line
from ...training import MRPConfig
from ..arguments import DataArguments, ModelArguments
from ..parser import MRPArgumentParser
from ..presets import install_presets
from ..refine import refine
from ..refine_arguments import DEFAULTS, RefineArguments
from . import COMMANDS

ARGUMENT_TYPES = (ModelArguments, DataArguments, RefineArguments, MRPConfig)


def make_parser(subparsers=None) -> MRPArgumentParser:
    """The refine parser, with examples/refine.py's defaults; a standalone one when ``subparsers`` is None
    (what the sweep parses each run's flags with)."""
    if subparsers is None:
        parser = MRPArgumentParser(ARGUMENT_TYPES, prog="hf-mrp refine")
    else:
        parser = subparsers.add_parser(
            "refine", help=COMMANDS["refine"], description=COMMANDS["refine"], dataclass_types=ARGUMENT_TYPES
        )
    parser.set_defaults(**DEFAULTS)
    set_help(parser, "mrp_objective", objectives_help())  # the registry now: with --objectives_module's objectives
    return install_presets(parser)  # --preset paper: the paper's released settings as defaults


def check_before_parsing(argv: list[str]) -> None:
    """Settings a local model's config.json refuses, before anything is loaded or created: --mrp_top_k above its
    vocabulary (MRPConfig, which cannot know the model, would refuse a large k as a memory problem), and
    --audit_layers / --lora_layers / --mrp_target_layers beyond its layers (else refused only once the model has
    loaded, after the audit before training)."""
    import argparse

    from ...models.layers import check_layer_flag
    from ...models.loading import local_config_number

    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    for flag in ("--mrp_top_k", "--model", "--gguf_file", "--audit_layers", "--lora_layers", "--mrp_target_layers"):
        peek.add_argument(flag)
    try:
        known, _ = peek.parse_known_args(argv)
        top_k = int(known.mrp_top_k) if known.mrp_top_k is not None else None
    except (argparse.ArgumentError, ValueError, SystemExit):
        return  # the real parser names the problem
    if known.gguf_file is not None:
        return
    name = known.model or "the embedded SmolLM2"
    vocab = local_config_number(known.model, "vocab_size")
    if top_k is not None and vocab is not None and top_k > vocab:
        raise MRPUserError(
            f"mrp_top_k {top_k} exceeds the vocabulary of {name} ({vocab:,} tokens): the Fisher "
            f"objective's top-k must be at most that; pass --mrp_top_k {vocab} or less "
            f"(the paper uses 5)"
        )
    n_layers = local_config_number(known.model, "num_hidden_layers")
    for flag, spec in (("--audit_layers", known.audit_layers), ("--lora_layers", known.lora_layers)):
        if n_layers is not None and spec is not None:
            check_layer_flag(flag, spec, n_layers, name)
    if n_layers is not None and known.mrp_target_layers is not None:
        _check_target_layers(known.mrp_target_layers, n_layers, name)


def _check_target_layers(spec: str, n_layers: int, name: str) -> None:
    """--mrp_target_layers within the intermediate layers 0..L-2 of the model (before the audit, not after it)."""
    from ...ops import MRPSettings

    bad = [i for i in MRPSettings(target_layers=spec).layer_indices if i > n_layers - 2]
    if bad:
        raise MRPUserError(
            f"mrp_target_layers {spec!r}: layer {bad[0]} is out of range for {name}, whose decoder layers are "
            f"0..{n_layers - 1} (the final one is the objective's own); choose layers in 0..{n_layers - 2}"
        )


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, RefineArguments, MRPConfig]:
    check_before_parsing(argv)
    return tuple(make_parser().parse_args_into_dataclasses(args=argv))


def main(model_args: ModelArguments, data_args: DataArguments, refine_args: RefineArguments, config: MRPConfig) -> None:
    comparison = refine(model_args, data_args, refine_args, config)
    if comparison:
        print(f"refined -> {config.output_dir}\n{flip_summary_line(comparison)}")
    report = Path(str(config.output_dir)) / "downstream" / "downstream.json"
    if comparison and refine_args.downstream is not None and report.is_file():  # --downstream: the verdicts, timed
        from ...storage.files import read_json
        from ..downstream import summary_line

        downstream = read_json(report)
        print(f"downstream ({downstream['provenance']['seconds']:.0f} s): {summary_line(downstream)}")
    if config.push_to_hub and config.hub_model_id:  # the repo create_repo answered: namespace included
        from huggingface_hub import constants

        print(f"pushed -> {constants.ENDPOINT}/{config.hub_model_id}")
