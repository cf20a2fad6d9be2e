"""One float32 pass of an audit: model x blocks -> per-position columns and each lens layer's columns.

The output head is replaced by one that computes ``ops.decision_statistics`` in float32 chunks from the final
hidden states (and ``ops.lens.lens_statistics`` from each lens layer's, through the final norm), through the
model's own logit transform: no logits are formed. Under torch.distributed the batches are sharded over the
processes and the shards gathered back into the single-process order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import Blocks
from ..models import carrier, decoder_layers, final_norm, head_replaced, logit_transform, output_head
from ..ops import decision_statistics
from ..ops.lens import LENS_STATISTICS, AffineTranslators, lens_statistics

if TYPE_CHECKING:
    from .manifold import ManifoldSampler

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
LENS_COLUMNS = LENS_STATISTICS
# A lens layer's key: its layer (the tuned lens' with translators, else the logit lens'), or ("logit", layer) for
# the logit lens of the same pass beside a tuned lens.
LensKey = int | tuple[str, int]
Columns = dict[str, np.ndarray]


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
    manifold: ManifoldSampler | None = None,
) -> tuple[Columns, dict[LensKey, Columns]]:
    """Per-position columns (final layer) and, for each layer in ``layers``, its lens columns (``LENS_COLUMNS``).

    ``block_indices`` restricts the audit to some blocks. Under torch.distributed each process
    audits every world_size-th batch (the batches a single process would form, so every number is
    bit-identical to a one-process run) and the shards are gathered on every rank. With ``translators``
    (a tuned lens) each layer's columns are those of the tuned lens, and the logit lens' columns of the same
    forward pass are returned too, under the keys ``("logit", layer)``. ``manifold`` keeps the sampled positions'
    hidden states of ``layers`` from the same passes (gathered across processes: ``manifold.gathered``).
    """
    margin_torch_dtype = torch.float32 if margin_dtype == "float32" else output_head(model)[0].dtype
    device = next(model.parameters()).device
    mask = blocks.position_mask()
    indices = np.arange(len(blocks.input_ids)) if block_indices is None else np.asarray(block_indices)
    columns: dict[str, list[np.ndarray]] = {name: [] for name in POSITION_COLUMNS}
    layer_columns: dict[LensKey, dict[str, list[np.ndarray]]] = {key: {} for key in lens_keys(layers, translators)}
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    starts = np.cumsum([0] + [int(mask[batch].sum()) for batch in batches])  # each batch's first audit position
    rank, world = process_rank_and_world()
    was_training = model.training
    model.eval()
    try:
        for number in tqdm(_schedule(len(batches), rank, world), desc="audit", unit="batch", disable=not progress):
            batch = None if number is None else batches[number]
            chosen = batches[0] if batch is None else batch
            if manifold is not None:
                manifold.begin_batch(None if number is None else int(starts[number]), int(mask[chosen].sum()))
            ids = torch.as_tensor(blocks.input_ids[chosen], device=device)
            batch_mask = torch.as_tensor(mask[chosen], device=device)
            targets = ids[:, 1:][batch_mask]
            stats, lens = _batch_statistics(
                model, ids, batch_mask, targets, layers, margin_torch_dtype, chunk_size, translators, manifold
            )
            if batch is not None:
                _append_batch(columns, layer_columns, batch, mask[batch], targets, stats, lens)
    finally:
        model.train(was_training)
    positions = {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in columns.items()}
    per_layer = {key: {k: np.concatenate(v) for k, v in cols.items()} for key, cols in layer_columns.items() if cols}
    if world > 1:
        positions, per_layer = _gather_shards(positions, per_layer, world)
    return positions, per_layer


def _schedule(n_batches: int, rank: int, world: int) -> list[int | None]:
    """This rank's batch numbers, padded with None to the same count on every rank (a sharded model's forward is
    collective): a None round runs the first batch and its numbers are discarded."""
    mine: list[int | None] = list(range(rank, n_batches, world))
    rounds = -(-n_batches // world)
    return mine + [None] * (rounds - len(mine))


def _append_batch(
    columns: dict[str, list[np.ndarray]],
    layer_columns: dict[LensKey, dict[str, list[np.ndarray]]],
    batch: np.ndarray,
    batch_mask: np.ndarray,
    targets: torch.Tensor,
    stats: dict[str, torch.Tensor],
    lens: dict[LensKey, dict[str, torch.Tensor]],
) -> None:
    """One batch's columns appended, in (block, position) order."""
    block_index, position = np.nonzero(batch_mask)
    columns["block"].append(batch[block_index].astype(np.int64))
    columns["position"].append(position.astype(np.int64))
    columns["target_id"].append(targets.cpu().numpy())
    for name in POSITION_COLUMNS[3:]:
        columns[name].append(stats[name].cpu().numpy())
    for key, layer_stats in lens.items():
        for name in LENS_COLUMNS:
            layer_columns[key].setdefault(name, []).append(layer_stats[name].cpu().numpy())


def lens_keys(layers: Sequence[int] | None, translators: AffineTranslators | None) -> list[LensKey]:
    """The lens columns' keys: each layer (its tuned lens with ``translators``, else its logit lens), and with
    ``translators`` also ("logit", layer): both lenses come from one forward pass."""
    keys: list[LensKey] = list(layers or [])
    return keys + [("logit", layer) for layer in layers or []] if translators is not None else keys


def _batch_statistics(
    model: torch.nn.Module,
    ids: torch.Tensor,
    batch_mask: torch.Tensor,
    targets: torch.Tensor,
    layers: list[int] | None,
    margin_torch_dtype: torch.dtype,
    chunk_size: int,
    translators: AffineTranslators | None = None,
    manifold: ManifoldSampler | None = None,
) -> tuple[dict[str, torch.Tensor], dict[LensKey, dict[str, torch.Tensor]]]:
    """One forward: the final layer's statistics and each lens layer's, all computed inside the output head
    (where W is whole, also under FSDP / ZeRO-3) through the model's own logit transform. ``manifold`` keeps each
    lens layer's hidden states as the model has them (the decoder layer's output; the final layer's after the final
    norm, as ``output_hidden_states`` gives them), before any norm or translator of the lens."""
    transform = logit_transform(model)
    blocks_out = decoder_layers(model)
    norm = final_norm(model) if layers else torch.nn.Identity()  # the identity is never applied: no lens layer
    captured: dict[int, torch.Tensor] = {}
    found: dict[str, Any] = {}
    last = len(blocks_out) - 1

    def lens_states(hidden: torch.Tensor, key: LensKey) -> torch.Tensor:
        """A lens layer's states at the audited positions: the final layer's own, or the layer's through the
        final norm (after its translator for a tuned lens; the final layer has none)."""
        layer = key[1] if isinstance(key, tuple) else key
        if layer == last:
            states = hidden
        else:
            states = captured[layer]
            if translators is not None and not isinstance(key, tuple):
                states = translators.translate(layer, states)
            states = norm(states)
        return states[:, :-1][batch_mask]

    def compute(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        final = hidden[:, :-1][batch_mask]
        if manifold is not None:
            for layer in layers or []:
                manifold.take(layer, final if layer == last else captured[layer][:, :-1][batch_mask])
        found["final"] = decision_statistics(
            final, weight, targets, bias, chunk_size=chunk_size, margin_dtype=margin_torch_dtype, transform=transform
        )
        states = {key: lens_states(hidden, key) for key in lens_keys(layers, translators)}
        found["lens"] = (
            lens_statistics(final, states, weight, targets, bias, chunk_size=chunk_size, transform=transform)
            if states
            else {}
        )
        return carrier(hidden)

    head_forward(model, ids, compute, captured, layers or [])
    return found["final"], found["lens"]


def _gather_shards(
    positions: Columns, per_layer: dict[LensKey, Columns], world: int
) -> tuple[Columns, dict[LensKey, Columns]]:
    """All-gather every rank's columns and restore the single-process (block, position) order."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (positions, per_layer))
    shards: list[tuple[Columns, dict[LensKey, Columns]]] = [shard for shard in gathered if len(shard[0]["block"])]
    if not shards:
        return positions, per_layer
    merged = {name: np.concatenate([shard[0][name] for shard in shards]) for name in positions}
    order = np.lexsort((merged["position"], merged["block"]))
    merged = {name: values[order] for name, values in merged.items()}
    layers = {
        layer: {key: np.concatenate([shard[1][layer][key] for shard in shards])[order] for key in columns}
        for layer, columns in shards[0][1].items()
    }
    return merged, layers
