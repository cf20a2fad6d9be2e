"""Named sets of `hf-mrp refine` flag defaults: ``--preset paper`` (the paper's released runs) or ``--preset FILE``
(.yaml / .json, flag -> value). A preset changes defaults only: flags given on the command line still win, in any
order, and ``--preset paper --help`` shows the preset's values as the defaults.

The paper preset is what the released run files of github.com/mellowmarshall/mrp-paper record
(results/run4_marginmax_1.0/train_summary.json, the margin-max run at lambda 1.0; the departures table of
docs/spec.md lists each setting next to the paper's text and hf_mrp's defaults). ``"auto"`` for ``bf16`` and
``model_dtype`` means bfloat16 where this machine supports it (a CUDA GPU with bf16), else float32.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import TypeVar

from ..errors import MRPUserError

TRAIN_BLOCKS_PER_STEP = 16  # effective batch of the released runs: epoch / step x train_dataset_blocks = 16 blocks
PAPER_BLOCK_SIZE = 2048

PAPER: dict = {
    "model": "Qwen/Qwen3.5-4B-Base",
    "model_dtype": "auto",
    "dataset": "wikitext",
    "dataset_config": "wikitext-103-raw-v1",
    "split": "train",
    "block_size": PAPER_BLOCK_SIZE,
    "max_positions": 1000 * TRAIN_BLOCKS_PER_STEP * (PAPER_BLOCK_SIZE - 1),  # 1,000 steps of 16 blocks, no repeat
    "audit_positions": 256_577,  # the paper's audit size (its audit read the validation split)
    "output_dir": "outputs/paper",
    "max_steps": 1000,
    "learning_rate": 2e-5,
    "lr_scheduler_type": "linear",
    "warmup_steps": 50,
    "weight_decay": 0.01,
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": TRAIN_BLOCKS_PER_STEP,
    "bf16": "auto",
    "gradient_checkpointing": True,
    "use_lora": False,
    "lora_layers": None,
    "mrp_objective": "margin",
    "mrp_lambda": 1.0,
    "mrp_margin_threshold": 1.0,
    "mrp_margin_normalization": "gated",
    "mrp_top_k": 5,
    "paper_curves": True,
}
PRESETS = {"paper": PAPER}
DATASET_COMPANIONS = ("dataset_config", "split", "text_column")  # a preset's settings of its own --dataset


def _without_companions_of_a_replaced_dataset(values: dict, args: list[str]) -> dict:
    """An explicit --dataset replaces the preset's corpus, and with it the preset's config / split / column for
    that corpus (WikiText's config would not apply to a local .txt file)."""
    if not any(arg == "--dataset" or arg.startswith("--dataset=") for arg in args):
        return values
    return {key: value for key, value in values.items() if key not in DATASET_COMPANIONS}


def bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve(values: dict) -> dict:
    """The preset with ``"auto"`` turned into this machine's choice (bf16 where supported)."""
    resolved = dict(values)
    if resolved.get("bf16") == "auto":
        resolved["bf16"] = bf16_supported()
    if resolved.get("model_dtype") == "auto":
        resolved["model_dtype"] = "bfloat16" if bf16_supported() else "float32"
    return resolved


def read_preset(name: str) -> dict:
    """A named preset, or the flag -> value mapping of a .yaml / .json file."""
    if name in PRESETS:
        return dict(PRESETS[name])
    path = Path(name)
    if path.suffix not in (".yaml", ".yml", ".json") or not path.is_file():
        raise MRPUserError(
            f"unknown preset {name!r}; choose {', '.join(PRESETS)} or a .yaml / .json file of flag: value lines"
        )
    import yaml

    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
    except yaml.YAMLError as error:
        raise MRPUserError(f"preset file {path} does not parse: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise MRPUserError(f"preset file {path} must hold a mapping of flag: value, got {type(values).__name__}")
    return values


def split_preset(argv: list[str]) -> tuple[list[str], str | None]:
    """(argv without --preset NAME, NAME or None); the flag may appear anywhere, once."""
    rest, names = [], []
    words = iter(argv)
    for word in words:
        if word == "--preset":
            name = next(words, None)
            if name is None:
                raise MRPUserError("--preset needs a value: paper, or a .yaml / .json file")
            names.append(name)
        elif word.startswith("--preset="):
            names.append(word.split("=", 1)[1])
        else:
            rest.append(word)
    if len(names) > 1:
        raise MRPUserError(f"--preset given {len(names)} times ({', '.join(names)}); give one")
    return rest, names[0] if names else None


def describe(values: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items())


ParserT = TypeVar("ParserT", bound=argparse.ArgumentParser)  # install_presets hands back the parser it was given


def install_presets(parser: ParserT) -> ParserT:
    """Give ``parser`` a ``--preset`` flag whose values become the defaults before the flags are parsed."""
    parser.add_argument(
        "--preset",
        default=argparse.SUPPRESS,
        metavar="NAME_OR_FILE",
        help="Flag defaults from a named preset or a .yaml / .json file; explicit flags win. "
        f"paper (the paper's released run files): {describe(PAPER)} ('auto': bf16 where "
        "supported). `--preset paper --help` shows them as the defaults.",
    )
    parser.__class__ = _preset_parser_class(type(parser))  # type: ignore[arg-type]  # typeshed: a class is Hashable
    return parser


@functools.cache
def _preset_parser_class(base: type) -> type:
    class PresetParser(base):
        """``base`` that takes ``--preset`` out of the flags and applies it as defaults first."""

        def parse_known_args(self, args=None, namespace=None):
            import sys

            args, name = split_preset(list(sys.argv[1:] if args is None else args))
            if name is not None:
                values = _without_companions_of_a_replaced_dataset(resolve(read_preset(name)), args)
                known = {action.dest for action in self._actions}
                unknown = sorted(set(values) - known)
                if unknown:
                    raise MRPUserError(f"preset {name!r} sets {unknown[0]!r}, which is no flag of this command")
                self.set_defaults(**values)
            return super().parse_known_args(args, namespace)

    PresetParser.__name__ = PresetParser.__qualname__ = f"Preset{base.__name__}"
    return PresetParser


__all__ = ["PAPER", "PRESETS", "install_presets", "read_preset", "resolve", "split_preset"]
