"""One float32 pass of an audit: model x blocks -> per-position columns, and every layer reader fed.

The output head is replaced by one that computes ``ops.decision_statistics`` in float32 chunks from the final
hidden states (and ``ops.lens.lens_statistics`` from the states the readers send through the head: readers.py),
through the model's own logit transform: no logits are formed. Under torch.distributed the batches are sharded
over the processes and the shards gathered back into the single-process order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import Blocks
from ..models import carrier, decoder_layers, final_norm, head_replaced, logit_transform, output_head
from ..ops import decision_statistics
from ..ops.lens import AffineTranslators, lens_statistics
from .readers import BatchStates, Columns, GatherColumns, LayerReader, lens_readers

POSITION_COLUMNS = (
    "block",
    "position",
    "target_id",
    "top1_id",
    "top2_id",
    "margin",
    "correct",
    "entropy",
    "p_top1",
    "target_logprob",
    "target_margin",
    "geometric_margin",
    "brier",
)


def process_rank_and_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def capture_output_into(captured: dict[int, torch.Tensor], layer: int) -> Callable[..., None]:
    """A forward hook that keeps a decoder layer's hidden states (its output, or its output's first item)."""

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        captured[layer] = output[0] if isinstance(output, (tuple, list)) else output

    return hook


def head_forward(model: torch.nn.Module, ids: torch.Tensor, compute: Callable, captured: dict, layers) -> None:
    """One forward with the output head replaced by ``compute``; ``layers``' outputs land in ``captured`` before the
    head runs (so ``compute`` may read them). The hooks are removed whatever happens."""
    blocks_out = decoder_layers(model)
    hooks = [blocks_out[layer].register_forward_hook(capture_output_into(captured, layer)) for layer in layers]
    try:
        with head_replaced(model, compute):
            model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def read_layers(
    model: torch.nn.Module,
    blocks: Blocks,
    readers: Sequence[LayerReader] = (),
    *,
    batch_size: int = 8,
    chunk_size: int = 1024,
    margin_dtype: str = "float32",
    block_indices: np.ndarray | None = None,
    progress: bool = True,
) -> Columns:
    """The final layer's per-position columns (``POSITION_COLUMNS``), and each reader fed from the same passes.

    ``block_indices`` restricts the audit to some blocks. Under torch.distributed each process audits every
    world_size-th batch (the batches a single process would form, so every number is bit-identical to a
    one-process run) and the shards are gathered on every rank; the readers are finished (``finish``) on every
    rank too, with a gather that restores the single-process order.
    """
    margin_torch_dtype = torch.float32 if margin_dtype == "float32" else output_head(model)[0].dtype
    device = next(model.parameters()).device
    mask = blocks.position_mask()
    indices = np.arange(len(blocks.input_ids)) if block_indices is None else np.asarray(block_indices)
    columns: dict[str, list[np.ndarray]] = {name: [] for name in POSITION_COLUMNS}
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    starts = np.cumsum([0] + [int(mask[batch].sum()) for batch in batches])  # each batch's first audit position
    layers = sorted({layer for reader in readers for layer in reader.layers})
    rank, world = process_rank_and_world()
    was_training = model.training
    model.eval()
    try:
        for number in tqdm(_schedule(len(batches), rank, world), desc="audit", unit="batch", disable=not progress):
            batch = None if number is None else batches[number]
            chosen = batches[0] if batch is None else batch
            for reader in readers:
                reader.begin_batch(None if number is None else int(starts[number]), int(mask[chosen].sum()))
            ids = torch.as_tensor(blocks.input_ids[chosen], device=device)
            batch_mask = torch.as_tensor(mask[chosen], device=device)
            targets = ids[:, 1:][batch_mask]
            stats = _batch_statistics(model, ids, batch_mask, targets, readers, layers, margin_torch_dtype, chunk_size)
            if batch is not None:
                _append_batch(columns, batch, mask[batch], targets, stats)
    finally:
        model.train(was_training)
    positions = {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in columns.items()}
    positions, gather = _gathered_positions(positions, world)
    for reader in readers:
        reader.finish(gather, world)
    return positions


def collect_statistics(
    model: torch.nn.Module,
    blocks: Blocks,
    *,
    batch_size: int = 8,
    chunk_size: int = 1024,
    margin_dtype: str = "float32",
    layers: list[int] | None = None,
    block_indices: np.ndarray | None = None,
    progress: bool = True,
    translators: AffineTranslators | None = None,
) -> tuple[Columns, dict[int | tuple[str, int], Columns]]:
    """``read_layers`` with the lenses, for callers that want the columns themselves: (per-position columns,
    {layer: its lens columns}); with ``translators`` the lens is the tuned lens and the logit lens' columns of the
    same pass are returned too, under ("logit", layer)."""
    readers = lens_readers(layers, translators)
    positions = read_layers(
        model,
        blocks,
        readers,
        batch_size=batch_size,
        chunk_size=chunk_size,
        margin_dtype=margin_dtype,
        block_indices=block_indices,
        progress=progress,
    )
    per_layer: dict[int | tuple[str, int], Columns] = {}
    for number, reader in enumerate(readers):  # the first: the lens asked for; then the logit lens beside it
        for layer, columns in reader.columns.items():
            per_layer[layer if number == 0 else (reader.name, layer)] = columns
    return positions, per_layer


def _schedule(n_batches: int, rank: int, world: int) -> list[int | None]:
    """This rank's batch numbers, padded with None to the same count on every rank (a sharded model's forward is
    collective): a None round runs the first batch and its numbers are discarded."""
    mine: list[int | None] = list(range(rank, n_batches, world))
    rounds = -(-n_batches // world)
    return mine + [None] * (rounds - len(mine))


def _append_batch(
    columns: dict[str, list[np.ndarray]],
    batch: np.ndarray,
    batch_mask: np.ndarray,
    targets: torch.Tensor,
    stats: dict[str, torch.Tensor],
) -> None:
    """One batch's columns appended, in (block, position) order."""
    block_index, position = np.nonzero(batch_mask)
    columns["block"].append(batch[block_index].astype(np.int64))
    columns["position"].append(position.astype(np.int64))
    columns["target_id"].append(targets.cpu().numpy())
    for name in POSITION_COLUMNS[3:]:
        columns[name].append(stats[name].cpu().numpy())


def _batch_statistics(
    model: torch.nn.Module,
    ids: torch.Tensor,
    batch_mask: torch.Tensor,
    targets: torch.Tensor,
    readers: Sequence[LayerReader],
    layers: list[int],
    margin_torch_dtype: torch.dtype,
    chunk_size: int,
) -> dict[str, torch.Tensor]:
    """One forward: the final layer's statistics, and each reader fed, all inside the output head (where W is
    whole, also under FSDP / ZeRO-3) through the model's own logit transform. The lens statistics of every
    reader's head inputs come from one ``lens_statistics`` call (the final layer's distribution computed once)."""
    transform = logit_transform(model)
    blocks_out = decoder_layers(model)
    norm = final_norm(model) if layers else torch.nn.Identity()  # the identity is never applied: no layer read
    captured: dict[int, torch.Tensor] = {}
    found: dict[str, Any] = {}

    def compute(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        states = BatchStates(captured, hidden, batch_mask, len(blocks_out) - 1, norm)
        final = states.at_positions(hidden)
        found["final"] = decision_statistics(
            final, weight, targets, bias, chunk_size=chunk_size, margin_dtype=margin_torch_dtype, transform=transform
        )
        inputs = [reader.head_inputs(states) for reader in readers]
        flat = {(i, layer): x for i, reader_inputs in enumerate(inputs) for layer, x in reader_inputs.items()}
        lens = (
            lens_statistics(final, flat, weight, targets, bias, chunk_size=chunk_size, transform=transform)
            if flat
            else {}
        )
        for i, reader in enumerate(readers):
            reader.read(states, {layer: lens[(i, layer)] for layer in inputs[i]})
        return carrier(hidden)

    head_forward(model, ids, compute, captured, layers)
    return found["final"]


def _gathered_positions(positions: Columns, world: int) -> tuple[Columns, GatherColumns]:
    """All-gather every rank's columns, restore the single-process (block, position) order, and return the gather
    that puts a reader's {layer: columns} in that order (the identity on one process)."""
    if world == 1:
        return positions, lambda local: local
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, positions)
    holding = [rank for rank, shard in enumerate(gathered) if len(shard["block"])]
    if not holding:
        return positions, lambda local: local
    merged = {name: np.concatenate([gathered[rank][name] for rank in holding]) for name in positions}
    order = np.lexsort((merged["position"], merged["block"]))

    def gather(local: dict[int, Columns]) -> dict[int, Columns]:
        shards: list[Any] = [None] * world
        dist.all_gather_object(shards, local)
        first = shards[holding[0]]
        return {
            layer: {key: np.concatenate([shards[rank][layer][key] for rank in holding])[order] for key in columns}
            for layer, columns in first.items()
        }

    return {name: values[order] for name, values in merged.items()}, gather
