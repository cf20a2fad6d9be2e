"""Fitting a tuned lens (`hf-mrp lens train`): one identity-initialized affine translator per layer, Adam at a
constant rate on KL(final || layer) (lens_objective), on positions disjoint from the audited ones; saved into a
lens folder (tuned_lens) every ``save_steps`` and resumed from it.

Under several processes every rank reads the hidden states of all training positions (one forward pass), takes
every world_size-th position of each step's batch, and the translators' gradients are summed over ranks: the
steps are those of one process on the whole batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import Blocks
from ..errors import MRPUserError, require_number
from ..models import decoder_layers, output_head
from ..ops.lens import AffineTranslators
from ..storage import files
from .collect import process_rank_and_world
from .lens_objective import LensObjective, collect_lens_inputs, step_positions
from .tuned_lens import CONFIG_FILE, FORMAT, TunedLens, block_hashes, load_optimizer_state, load_translators, save_lens

logger = logging.getLogger(__name__)


@dataclass
class LensTrainingSettings:
    """How the translators are fitted: Adam at a constant rate (so a run extended to more steps equals one run)."""

    max_steps: int = 250  # the tuned-lens library's; 60 left the held-out KL 1.4-1.7x higher (docs/audit.md)
    batch_positions: int = 128
    learning_rate: float = 1e-3
    seed: int = 0
    save_steps: int = 25
    chunk_size: int = 256


def translated_layers(n_layers: int, layers: list[int] | None) -> list[int]:
    """The layers that get a translator: the chosen ones (default all) but the last, which is the model's output."""
    chosen = list(range(n_layers)) if layers is None else layers
    return [layer for layer in chosen if layer != n_layers - 1]


def _all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def train_tuned_lens(
    model: torch.nn.Module,
    blocks: Blocks,
    output_dir: str | Path,
    *,
    model_name: str,
    layers: list[int] | None = None,
    settings: LensTrainingSettings | None = None,
    holdout_positions: int = 0,
    stream_start_token: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> TunedLens:
    """Fit one identity-initialized affine translator per layer on ``blocks`` (the training positions) and save
    the lens into ``output_dir``; a folder holding a lens of the same training set-up resumes from its step.
    ``stream_start_token``: where ``blocks`` begin in their source's token stream when they were cut from it
    (`hf-mrp lens train`); audits read from that stream's start are then refused once they reach it, at any
    block size."""
    settings = settings or LensTrainingSettings()
    _check_settings(settings)
    output_dir = files.ensure_output_dir(output_dir)
    n_layers = len(decoder_layers(model))
    chosen = translated_layers(n_layers, layers)
    if not chosen:
        raise MRPUserError("no layer to translate: the last layer is the model's own output; choose earlier layers")
    weight = output_head(model)[0]
    config = _new_config(model_name, n_layers, weight, chosen, blocks, settings, holdout_positions, stream_start_token)
    translators = AffineTranslators(chosen, int(weight.shape[1])).to(weight.device)
    for parameter in translators.parameters():  # every rank all-reduces a gradient, even with no position in a step
        parameter.grad = torch.zeros_like(parameter)
    optimizer = torch.optim.Adam(translators.parameters(), lr=settings.learning_rate)
    start_step, log = _resume(output_dir, config, translators, optimizer)
    if start_step >= settings.max_steps:
        logger.warning(
            "the tuned lens in %s is trained to step %d already (--max_steps %d)",
            output_dir,
            start_step,
            settings.max_steps,
        )
        return TunedLens(translators, {**config, "step": start_step, "log": log, "path": str(output_dir)})
    began = time.perf_counter()
    writer = process_rank_and_world()[0] == 0

    def checkpoint(done: int) -> None:
        state = {**config, "step": done, "log": log, "seconds": time.perf_counter() - began}
        save_lens(output_dir, translators, optimizer, state, writer)

    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # only the translators learn; no gradient of W or the norm is ever formed
    try:
        final_hidden, layer_hidden, _ = collect_lens_inputs(model, blocks, chosen, batch_size)
        objective = LensObjective(model, translators, final_hidden, layer_hidden, settings.chunk_size)
        _fit(objective, optimizer, settings, start_step, log, checkpoint, progress)
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
    return TunedLens(translators, {**config, "step": settings.max_steps, "log": log, "path": str(output_dir)})


def _fit(
    objective: LensObjective,
    optimizer: torch.optim.Optimizer,
    settings: LensTrainingSettings,
    start_step: int,
    log: list[dict],
    checkpoint: Callable[[int], None],
    progress: bool,
) -> None:
    """Steps ``start_step`` .. ``max_steps`` - 1, each logged into ``log``; a checkpoint every ``save_steps`` and
    at the end."""
    rank, world = process_rank_and_world()
    n_positions = len(objective.final_hidden)
    for step in tqdm(range(start_step, settings.max_steps), desc="lens", disable=not progress or rank != 0):
        index = step_positions(step, n_positions, settings.batch_positions, settings.seed)
        log.append(_step(objective, optimizer, step, index, rank, world))
        done = step + 1
        if done == settings.max_steps or (settings.save_steps and done % settings.save_steps == 0):
            checkpoint(done)


def _step(
    objective: LensObjective,
    optimizer: torch.optim.Optimizer,
    step: int,
    index: np.ndarray,
    rank: int,
    world: int,
) -> dict:
    """One Adam step on this rank's share of the step's positions, the gradients summed over ranks; its log entry."""
    sums = objective.backward(index[rank::world], len(index))
    translators = objective.translators
    totals = torch.tensor([sums[layer] for layer in translators.layers], dtype=torch.float64)
    if world > 1:
        _all_reduce_sum([*_gradients(translators), totals])
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    return {
        "step": step + 1,
        "mean_kl": float(totals.mean()) / len(index),
        "kl_by_layer": [float(v) / len(index) for v in totals],
    }


def _gradients(translators: AffineTranslators) -> list[torch.Tensor]:
    """The translators' gradients: zeros before the first step, kept (never set to None) between steps."""
    gradients = [parameter.grad for parameter in translators.parameters()]
    present = [gradient for gradient in gradients if gradient is not None]
    if len(present) != len(gradients):
        raise RuntimeError("a translator lost its gradient tensor (zero_grad must keep it: set_to_none=False)")
    return present


def _check_settings(settings: LensTrainingSettings) -> None:
    for name in ("max_steps", "batch_positions", "chunk_size", "save_steps"):
        require_number(name, getattr(settings, name), integer=True)
    for name in ("max_steps", "batch_positions", "chunk_size"):
        if getattr(settings, name) < 1:
            raise MRPUserError(f"{name} must be a positive integer, got {getattr(settings, name)!r}")
    if settings.save_steps < 0:
        raise MRPUserError(f"save_steps must be >= 0 (0: save at the end only), got {settings.save_steps!r}")
    require_number("learning_rate", settings.learning_rate)
    if not settings.learning_rate > 0:
        raise MRPUserError(f"learning_rate must be a finite number > 0, got {settings.learning_rate!r}")


def _new_config(
    model_name: str,
    n_layers: int,
    weight: torch.Tensor,
    layers: list[int],
    blocks: Blocks,
    settings: LensTrainingSettings,
    holdout_positions: int,
    stream_start_token: int | None,
) -> dict:
    return {
        "format": FORMAT,
        "model": model_name,
        "num_hidden_layers": n_layers,
        "hidden_size": int(weight.shape[1]),
        "vocab_size": int(weight.shape[0]),
        "layers": layers,
        "training": {
            "data_source": blocks.source,
            "block_size": blocks.block_size,
            "n_positions": int(blocks.n_positions),
            "holdout_positions": int(holdout_positions),
            "stream_start_token": stream_start_token,
            "blocks_sha256": blocks.fingerprint(),
            "tokenizer_sha256": blocks.tokenizer,
            "block_hashes": block_hashes(blocks.input_ids),
        },
        "settings": asdict(settings),
    }


SAME_SETUP = ("model", "num_hidden_layers", "hidden_size", "vocab_size", "layers", "training")
SAME_SETTINGS = ("batch_positions", "learning_rate", "seed", "chunk_size")


def _resume(
    output_dir: Path, config: dict, translators: AffineTranslators, optimizer: torch.optim.Optimizer
) -> tuple[int, list]:
    """(step to start from, log so far): 0 and [] for an empty folder; a lens of the same set-up is resumed."""
    if not (output_dir / CONFIG_FILE).is_file():
        return 0, []
    saved = files.read_json(output_dir / CONFIG_FILE)
    differs = [key for key in SAME_SETUP if saved.get(key) != config[key]]
    differs += [
        f"settings.{key}" for key in SAME_SETTINGS if saved.get("settings", {}).get(key) != config["settings"][key]
    ]
    if differs:
        raise MRPUserError(
            f"{output_dir} holds a tuned lens trained with other settings ({', '.join(differs)} "
            "differ); choose another --output_dir, or pass --overwrite_output_dir true to start afresh"
        )
    step = int(saved["step"])
    load_translators(output_dir, translators, step)
    load_optimizer_state(output_dir, optimizer, step)
    logger.warning("resuming the tuned lens in %s from step %d", output_dir, step)
    return step, list(saved.get("log", []))
