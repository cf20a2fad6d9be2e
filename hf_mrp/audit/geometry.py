"""The float32 geometry audit: model x blocks -> per-position table, audit.json, plots.

Data flow: blocks -> forward whose output head computes ``ops.decision_statistics`` in float32
chunks from the final hidden states (and each lens layer's, through the final norm), through the
model's own logit transform -> per-position columns -> summary and gap fit. No logits are formed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from ..data import Blocks, check_block_fits
from ..errors import MRPUserError, require_number
from ..models import carrier, decoder_layers, final_norm, head_replaced, logit_transform, output_head, parse_layer_spec
from ..ops import decision_statistics, fit_gap_law
from ..ops.lens import LENS_STATISTICS, AffineTranslators, lens_statistics
from ..reporting import lens_plots, plots
from ..stats.calibration import expected_calibration_error
from ..storage import files
from .layers import layer_summary, margin_percentiles, summarize_layers
from .summary import AuditSummary

if TYPE_CHECKING:
    from .tuned_lens import TunedLens

logger = logging.getLogger(__name__)

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
MARGIN_DTYPES = ("float32", "model")  # margins in float32 (the spec), or in the model dtype (the bf16 artifact)


@dataclass
class AuditResult:
    """What an audit measured: the summary (audit.json), per-position columns, the blocks, layers."""

    summary: AuditSummary
    positions: dict[str, np.ndarray]
    blocks: Blocks
    layers: list[dict] | None = None
    files: dict[str, Path] = field(default_factory=dict)
    logit_layers: list[dict] | None = None  # with a tuned lens: the logit lens of the same pass, for comparison


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


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
) -> tuple[dict[str, np.ndarray], dict[int, dict[str, np.ndarray]]]:
    """Per-position columns (final layer) and, for each layer in ``layers``, its lens columns (``LENS_COLUMNS``).

    ``block_indices`` restricts the audit to some blocks. Under torch.distributed each process
    audits every world_size-th batch (the batches a single process would form, so every number is
    bit-identical to a one-process run) and the shards are gathered on every rank. With ``translators``
    (a tuned lens) each layer's columns are those of the tuned lens, and the logit lens' columns of the same
    forward pass are returned too, under the keys ``("logit", layer)``.
    """
    margin_torch_dtype = torch.float32 if margin_dtype == "float32" else output_head(model)[0].dtype
    device = _model_device(model)
    mask = blocks.position_mask()
    indices = np.arange(len(blocks.input_ids)) if block_indices is None else np.asarray(block_indices)
    columns: dict[str, list[np.ndarray]] = {name: [] for name in POSITION_COLUMNS}
    layer_columns: dict = {key: {} for key in _lens_keys(layers, translators)}
    was_training = model.training
    model.eval()
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    rank, world = _process_rank_and_world()
    mine = batches[rank::world]
    rounds = -(-len(batches) // world)
    # every rank runs the same number of forwards (a sharded model's forward is collective); extras are discarded
    schedule = mine + [None] * (rounds - len(mine))
    try:
        for batch in tqdm(schedule, desc="audit", unit="batch", disable=not progress):
            chosen = batches[0] if batch is None else batch
            ids = torch.as_tensor(blocks.input_ids[chosen], device=device)
            batch_mask = torch.as_tensor(mask[chosen], device=device)
            targets = ids[:, 1:][batch_mask]
            stats, lens = _batch_statistics(
                model, ids, batch_mask, targets, layers, margin_torch_dtype, chunk_size, translators
            )
            if batch is None:
                continue
            block_index, position = np.nonzero(mask[batch])
            columns["block"].append(batch[block_index].astype(np.int64))
            columns["position"].append(position.astype(np.int64))
            columns["target_id"].append(targets.cpu().numpy())
            for name in POSITION_COLUMNS[3:]:
                columns[name].append(stats[name].cpu().numpy())
            for key, layer_stats in lens.items():
                for name in LENS_COLUMNS:
                    layer_columns[key].setdefault(name, []).append(layer_stats[name].cpu().numpy())
    finally:
        model.train(was_training)
    positions = {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in columns.items()}
    per_layer = {key: {k: np.concatenate(v) for k, v in cols.items()} for key, cols in layer_columns.items() if cols}
    if world > 1:
        positions, per_layer = _gather_shards(positions, per_layer, world)
    return positions, per_layer


def _lens_keys(layers: list[int] | None, translators: AffineTranslators | None) -> list:
    """The lens columns' keys: each layer (its tuned lens with ``translators``, else its logit lens), and with
    ``translators`` also ("logit", layer): both lenses come from one forward pass."""
    keys: list = list(layers or [])
    return keys + [("logit", layer) for layer in keys] if translators is not None else keys


def _batch_statistics(
    model: torch.nn.Module,
    ids: torch.Tensor,
    batch_mask: torch.Tensor,
    targets: torch.Tensor,
    layers: list[int] | None,
    margin_torch_dtype: torch.dtype,
    chunk_size: int,
    translators: AffineTranslators | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """One forward: the final layer's statistics and each lens layer's, all computed inside the output head
    (where W is whole, also under FSDP / ZeRO-3) through the model's own logit transform."""
    transform = logit_transform(model)
    blocks_out = decoder_layers(model)
    norm = final_norm(model) if layers else None
    captured: dict[int, torch.Tensor] = {}
    hooks = [blocks_out[layer].register_forward_hook(_capture_into(captured, layer)) for layer in layers or []]
    found: dict = {}
    last = len(blocks_out) - 1

    def lens_states(hidden: torch.Tensor, key) -> torch.Tensor:
        """A lens layer's states at the audited positions: the final layer's own, or the layer's through the
        final norm (after its translator for a tuned lens; the final layer has none)."""
        tuned, layer = (False, key[1]) if isinstance(key, tuple) else (translators is not None, key)
        if layer == last:
            states = hidden
        else:
            states = captured[layer]
            states = norm(translators.translate(layer, states) if tuned else states)
        return states[:, :-1][batch_mask]

    def compute(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        final = hidden[:, :-1][batch_mask]
        found["final"] = decision_statistics(
            final, weight, targets, bias, chunk_size=chunk_size, margin_dtype=margin_torch_dtype, transform=transform
        )
        states = {key: lens_states(hidden, key) for key in _lens_keys(layers, translators)}
        found["lens"] = (
            lens_statistics(final, states, weight, targets, bias, chunk_size=chunk_size, transform=transform)
            if states
            else {}
        )
        return carrier(hidden)

    try:
        with head_replaced(model, compute):
            model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return found["final"], found["lens"]


def _capture_into(captured: dict, layer: int):
    def hook(module, args, output):
        captured[layer] = output[0] if isinstance(output, (tuple, list)) else output

    return hook


def _process_rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_shards(positions: dict, per_layer: dict, world: int) -> tuple[dict, dict]:
    """All-gather every rank's columns and restore the single-process (block, position) order."""
    import torch.distributed as dist

    shards: list = [None] * world
    dist.all_gather_object(shards, (positions, per_layer))
    shards = [shard for shard in shards if len(shard[0]["block"])]
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


def summarize_positions(positions: dict[str, np.ndarray]) -> dict:
    """audit.json's numbers (`AuditSummary` less provenance and layers), from the per-position columns alone (so
    any table can be re-summarized)."""
    margin = positions["margin"].astype(np.float64)
    if margin.size == 0:
        raise MRPUserError("no positions were evaluated; pass more text or a larger --max_positions")
    correct = positions["correct"].astype(bool)
    spearman = spearmanr(positions["entropy"], margin).statistic if margin.size > 1 else float("nan")
    return {
        "n_positions": int(margin.size),
        "accuracy": float(correct.mean()),
        "margin_percentiles": margin_percentiles(margin),
        "mean_margin": float(margin.mean()),
        "fraction_margin_lt_0_5": float((margin < 0.5).mean()),
        "entropy_margin_spearman": float(spearman),
        "gap_fit": fit_gap_law(margin),
        "n_unique_margins": int(np.unique(positions["margin"]).size),
        "mean_entropy": float(positions["entropy"].astype(np.float64).mean()),
        "mean_cross_entropy": float(-positions["target_logprob"].astype(np.float64).mean()),
        "ece": expected_calibration_error(positions["p_top1"], correct),
        "brier": float(positions["brier"].astype(np.float64).mean()),
    }


def check_audit_settings(margin_dtype: str, chunk_size: int, batch_size: int, lens_bootstrap: int) -> None:
    """The one check of an audit's settings (AuditArguments runs it at parse time, before any work)."""
    for name, value in (("chunk_size", chunk_size), ("batch_size", batch_size), ("lens_bootstrap", lens_bootstrap)):
        require_number(name, value, integer=True)
    if margin_dtype not in MARGIN_DTYPES:
        raise MRPUserError(f"margin_dtype must be one of {', '.join(MARGIN_DTYPES)}, got {margin_dtype!r}")
    if chunk_size < 1 or batch_size < 1:
        raise MRPUserError(f"chunk_size and batch_size must be positive, got {chunk_size} and {batch_size}")
    if lens_bootstrap < 0:
        raise MRPUserError(f"lens_bootstrap must be a number of resamples >= 0 (0: no intervals), got {lens_bootstrap}")


def run_audit(
    model: torch.nn.Module,
    blocks: Blocks,
    *,
    output_dir: str | Path | None = None,
    batch_size: int = 8,
    chunk_size: int = 1024,
    margin_dtype: str = "float32",
    layers: str | list[int] | None = None,
    provenance: dict | None = None,
    progress: bool = True,
    lens: TunedLens | None = None,
    lens_bootstrap: int = 0,
) -> AuditResult:
    """Audit ``model`` on ``blocks``; write the files to ``output_dir`` when given.

    ``layers`` adds the layer-wise lens (the logit lens; with ``lens``, a tuned lens from `hf-mrp lens train`,
    every layer-wise statistic is the tuned lens', the logit lens' of the same pass is kept beside it, and
    ``layers`` defaults to the lens' layers). ``lens_bootstrap`` > 0 adds block-bootstrap intervals of the
    per-layer correlations and KL, with that many resamples.
    """
    check_audit_settings(margin_dtype, chunk_size, batch_size, lens_bootstrap)
    if output_dir is not None:
        output_dir = files.ensure_output_dir(output_dir)
    check_block_fits(model, blocks.block_size)
    n_layers = len(decoder_layers(model))
    if lens is not None and layers is None:
        layers = [*lens.layers, n_layers - 1]
    layer_list = parse_layer_spec(layers, n_layers) if layers is not None else None
    if lens is not None:
        lens.check_model(model)
        lens.check_layers(layer_list, n_layers)
        lens.check_disjoint(blocks)
    positions, per_layer = collect_statistics(
        model,
        blocks,
        batch_size=batch_size,
        chunk_size=chunk_size,
        margin_dtype=margin_dtype,
        layers=layer_list,
        progress=progress,
        translators=None if lens is None else lens.translators,
    )
    summary = {
        "provenance": {
            **(provenance or {}),
            "data_source": blocks.source,
            "block_size": blocks.block_size,
            "n_blocks": int(len(blocks.input_ids)),
            "blocks_sha256": blocks.fingerprint(),
            "tokenizer_sha256": blocks.tokenizer,
            "margin_dtype": margin_dtype,
            "model_dtype": str(output_head(model)[0].dtype).replace("torch.", ""),
        },
        **summarize_positions(positions),
    }
    final_ce = -positions["target_logprob"]

    def rows_of(columns: dict) -> list[dict]:
        return summarize_layers(columns, final_ce, positions["block"], lens_bootstrap)

    layer_rows = rows_of({k: v for k, v in per_layer.items() if not isinstance(k, tuple)}) if layer_list else None
    logit_rows = rows_of({k[1]: v for k, v in per_layer.items() if isinstance(k, tuple)}) if lens else None
    if layer_rows is not None:
        summary["layers"] = layer_summary(layer_rows, "logit" if lens is None else "tuned")
        if lens is not None:
            summary["layers"]["lens_path"] = lens.config.get("path")
            summary["layers"]["lens_training"] = {
                key: lens.config["training"][key] for key in ("data_source", "n_positions", "blocks_sha256")
            }
    result = AuditResult(AuditSummary(**summary), positions, blocks, layer_rows, logit_layers=logit_rows)
    if output_dir is not None:
        rank, world = _process_rank_and_world()
        if rank == 0:
            write_audit(result, output_dir)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # no rank reads the folder before it is complete
    return result


def write_audit(result: AuditResult, output_dir: str | Path) -> dict[str, Path]:
    """audit.json, positions.parquet, blocks.npy, gap_curve.png, margins.png (+ layers.json/png)."""
    output_dir = Path(output_dir)
    paths = {
        "blocks": output_dir / "blocks.npy",
        "positions": output_dir / "positions.parquet",
        "gap_curve": output_dir / "gap_curve.png",
        "margins": output_dir / "margins.png",
        "audit": output_dir / "audit.json",
    }
    files.write_npy(paths["blocks"], result.blocks.input_ids)
    if result.blocks.mask is not None:  # the evaluated positions, when not the first n_positions
        paths["mask"] = output_dir / "mask.npy"
        files.write_npy(paths["mask"], result.blocks.mask)
    else:
        (output_dir / "mask.npy").unlink(missing_ok=True)  # from an earlier audit into the same folder
    files.write_parquet(paths["positions"], result.positions)
    plots.plot_gap_curves(paths["gap_curve"], {"audit": result.summary.gap_fit.to_dict()})
    plots.plot_margin_histograms(paths["margins"], {"audit": result.positions["margin"]})
    if result.layers is not None:
        paths["layers"] = output_dir / "layers.json"
        paths["layers_plot"] = output_dir / "layers.png"
        extra = {} if result.logit_layers is None else {"logit_lens_layers": result.logit_layers}
        files.write_json(paths["layers"], {"layers": result.layers, **result.summary.layers, **extra})
        plots.plot_layers(paths["layers_plot"], result.layers, result.summary.layers["lens"])
        paths.update(lens_plots.plot_lens_figures(output_dir, _rows_by_lens(result)))
    files.write_json(paths["audit"], result.summary.to_json())  # last: its presence marks a complete audit
    result.files = paths
    return paths


def _rows_by_lens(result: AuditResult) -> dict[str, list[dict]]:
    if result.logit_layers is None:
        return {"logit lens": result.layers}
    return {"logit lens": result.logit_layers, "tuned lens": result.layers}


def load_audit(directory: str | Path) -> AuditResult:
    """Read an audit folder back (audit.json is written last, so its presence means complete)."""
    directory = Path(directory)
    if not (directory / "audit.json").is_file():
        raise MRPUserError(f"{directory} holds no complete audit (audit.json missing); run `hf-mrp audit` into it")
    summary = AuditSummary.from_json(files.read_json(directory / "audit.json"))
    positions = files.read_parquet(directory / "positions.parquet")
    input_ids = files.read_npy(directory / "blocks.npy")
    origin = summary.provenance
    mask = files.read_npy(directory / "mask.npy") if (directory / "mask.npy").is_file() else None
    blocks = Blocks(
        input_ids,
        int(summary.n_positions),
        origin.get("data_source", ""),
        origin.get("tokenizer_sha256") or "",
        mask=mask,
    )
    layers = files.read_json(directory / "layers.json")["layers"] if (directory / "layers.json").is_file() else None
    return AuditResult(summary, positions, blocks, layers)
