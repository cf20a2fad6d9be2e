"""`hf-mrp lens train`: fit a tuned lens (one affine translator per layer) on positions after the audited ones."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ...errors import MRPUserError, require_number
from ..arguments import DataArguments, ModelArguments
from . import COMMANDS

ACTIONS = ("train",)


@dataclass
class LensArguments:
    """Which lens to train and how (the positions come from the --dataset flags, after --holdout_positions)."""

    action: str = field(default="train", metadata={"positional": True, "help": "What to do: train."})
    output_dir: str = field(default="outputs/lens", metadata={"help": "Folder for lens.safetensors and its config."})
    layers: str | None = field(
        default=None,
        metadata={
            "help": "0-based layers to translate: 'all' (default; the last layer needs none), '20-29' or '3,5,7'."
        },
    )
    holdout_positions: int = field(
        default=16384,
        metadata={
            "help": "Positions at the start of the data left out of training: those an audit with the same "
            "data flags and --max_positions up to this many evaluates (disjoint from the lens' own)."
        },
    )
    max_steps: int = field(default=250, metadata={"help": "Adam steps (constant learning rate)."})
    batch_positions: int = field(default=128, metadata={"help": "Training positions per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam's learning rate for the translators."})
    seed: int = field(default=0, metadata={"help": "Seed of each step's position draw."})
    save_steps: int = field(
        default=25,
        metadata={
            "help": "Save (and allow resuming) every this many steps; 0: at "
            "the end only. A rerun into the folder resumes."
        },
    )
    chunk_size: int = field(default=256, metadata={"help": "Positions per float32 [chunk x vocab] chunk of the loss."})
    batch_size: int = field(default=8, metadata={"help": "Blocks per forward pass when reading hidden states."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in a folder holding a lens trained with other settings."},
    )

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise MRPUserError(f"unknown lens action {self.action!r}; use `hf-mrp lens train`")
        for name in (
            "holdout_positions",
            "max_steps",
            "batch_positions",
            "save_steps",
            "chunk_size",
            "batch_size",
            "seed",
        ):
            require_number(name, getattr(self, name), integer=True)
        if self.holdout_positions < 0 or self.batch_size < 1:
            raise MRPUserError(
                f"holdout_positions must be >= 0 and batch_size >= 1, got {self.holdout_positions} "
                f"and {self.batch_size}"
            )

    def settings(self):
        from ...audit.lens_training import LensTrainingSettings

        return LensTrainingSettings(
            max_steps=self.max_steps,
            batch_positions=self.batch_positions,
            learning_rate=self.learning_rate,
            seed=self.seed,
            save_steps=self.save_steps,
            chunk_size=self.chunk_size,
        )


def make_parser(subparsers):
    parser = subparsers.add_parser(
        "lens",
        help=COMMANDS["lens"],
        description=COMMANDS["lens"],
        dataclass_types=(ModelArguments, DataArguments, LensArguments),
    )
    parser.set_defaults(max_positions=4096)  # training positions: a CPU-sized default
    return parser


def training_blocks(tokenizer, data_args: DataArguments, holdout_positions: int):
    """The blocks after the first ceil(holdout / (block_size - 1)) ones, which an audit of up to
    ``holdout_positions`` positions with the same data flags reads."""
    import numpy as np

    from ...audit.tuned_lens import training_start_token
    from ...data import Blocks
    from ..loading import load_blocks_from_arguments

    blocks = load_blocks_from_arguments(tokenizer, data_args, extra_positions=holdout_positions)
    per_block = blocks.block_size - 1
    skipped = training_start_token(holdout_positions, blocks.block_size) // blocks.block_size
    remaining = blocks.n_positions - skipped * per_block
    if remaining <= 0:
        raise MRPUserError(
            f"the data has {blocks.n_positions} positions, all within the {holdout_positions} held-out "
            "ones; pass more text, or a smaller --holdout_positions"
        )
    return Blocks(
        np.asarray(blocks.input_ids[skipped:]), min(remaining, data_args.max_positions), blocks.source, blocks.tokenizer
    )


def _forget_lens(folder) -> None:
    from pathlib import Path

    from ...audit.tuned_lens import CONFIG_FILE, LENS_FILE, OPTIMIZER_FILE

    for name in (CONFIG_FILE, LENS_FILE, OPTIMIZER_FILE):  # the config first: the rest is then no lens
        (Path(folder) / name).unlink(missing_ok=True)


def main(model_args: ModelArguments, data_args: DataArguments, lens_args: LensArguments) -> None:
    from accelerate import PartialState

    from ...audit.lens_training import train_tuned_lens
    from ...audit.tuned_lens import layer_spans, training_start_token
    from ...data import check_block_fits
    from ...models import decoder_layers, parse_layer_spec
    from ...storage.locks import is_main_process, owned_folder
    from ..loading import load_model_from_arguments

    state = PartialState()  # joins the process group under torchrun / accelerate launch: ranks shard each step
    settings = lens_args.settings()
    with owned_folder(lens_args.output_dir, active=is_main_process()):
        model, tokenizer, name = load_model_from_arguments(model_args)
        check_block_fits(model, data_args.block_size)
        n_layers = len(decoder_layers(model))
        layers = parse_layer_spec(lens_args.layers, n_layers) if lens_args.layers is not None else None
        blocks = training_blocks(tokenizer, data_args, lens_args.holdout_positions)
        if lens_args.overwrite_output_dir and is_main_process():
            _forget_lens(lens_args.output_dir)
        state.wait_for_everyone()
        start = time.perf_counter()
        lens = train_tuned_lens(
            model,
            blocks,
            lens_args.output_dir,
            model_name=name,
            layers=layers,
            settings=settings,
            holdout_positions=lens_args.holdout_positions,
            stream_start_token=training_start_token(lens_args.holdout_positions, data_args.block_size),
            batch_size=lens_args.batch_size,
        )
    if not is_main_process():  # one summary (rank 0)
        return
    log = lens.config["log"]
    first, last = (log[0]["mean_kl"], log[-1]["mean_kl"]) if log else (float("nan"), float("nan"))
    reached = log[-1]["step"] if log else 0
    print(
        f"tuned lens for layers {layer_spans(lens.layers)} on {blocks.n_positions} positions, "
        f"{settings.max_steps} steps in {time.perf_counter() - start:.1f}s -> {lens_args.output_dir}\n"
        f"training KL(final || layer), mean over layers: step 1 {first:.4f} -> step {reached} {last:.4f}"
    )
