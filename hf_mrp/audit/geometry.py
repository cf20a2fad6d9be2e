"""The float32 geometry audit: model x blocks -> per-position table, audit.json, plots.

Data flow: blocks -> one chunked float32 pass (``collect.collect_statistics``: no logits are formed) ->
per-position columns -> summary and gap fit (and, with ``layers``, the per-layer lens rows of ``layers``) ->
the audit folder (staged beside it and swapped in whole, audit.json last). ``load_audit`` reads a folder back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data import Blocks, check_block_fits
from ..errors import MRPUserError, require_number
from ..models import decoder_layers, output_head, parse_layer_spec
from ..ops import fit_gap_law
from ..reporting import lens_plots, manifold_plots, plots
from ..stats.calibration import expected_calibration_error
from ..stats.correlation import spearman
from ..storage import files
from .audit_files import AUDIT_MARKER, WRITE_ORDER
from .collect import process_rank_and_world, read_layers
from .layers import correct_wrong_gap, layer_summary, margin_percentiles
from .manifold import ManifoldOptions, manifold_reader
from .readers import LayerReader, audit_readers, joined_rows
from .summary import AuditSummary

if TYPE_CHECKING:
    from .tuned_lens import TunedLens

logger = logging.getLogger(__name__)

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
    seconds: float = 0.0  # wall-clock time of the whole audit, set by research.audit_run (0.0: not measured)


def summarize_positions(positions: dict[str, np.ndarray]) -> dict:
    """audit.json's numbers (`AuditSummary` less provenance and layers), from the per-position columns alone (so
    any table can be re-summarized)."""
    margin = positions["margin"].astype(np.float64)
    if margin.size == 0:
        raise MRPUserError("no positions were evaluated; pass more text or a larger --max_positions")
    correct = positions["correct"].astype(bool)
    return {
        "n_positions": int(margin.size),
        "accuracy": float(correct.mean()),
        "margin_percentiles": margin_percentiles(margin),
        "mean_margin": float(margin.mean()),
        "fraction_margin_lt_0_5": float((margin < 0.5).mean()),
        "entropy_margin_spearman": spearman(positions["entropy"], margin),
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


def check_blocks_to_audit(blocks: Blocks) -> None:
    """Refuse blocks that evaluate no position: an audit of nothing has no margin, accuracy or gap law."""
    if not isinstance(blocks, Blocks):
        raise MRPUserError(
            f"an audit needs hf_mrp Blocks, got {type(blocks).__name__}; build them with hf_mrp.load_blocks, "
            "make_blocks or labeled_blocks"
        )
    if blocks.n_positions == 0:
        raise MRPUserError(
            f"the blocks ({blocks.source or 'unnamed'}) evaluate no position: nothing to audit; pass text with "
            "at least one position (with labeled_blocks, at least one label that is not -100)"
        )


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
    manifold: bool | ManifoldOptions | None = None,
    readers: Sequence[LayerReader] = (),
) -> AuditResult:
    """Audit ``model`` on ``blocks``; write the files to ``output_dir`` when given.

    ``layers`` adds the layer-wise lens (the logit lens; with ``lens``, a tuned lens from `hf-mrp lens train`,
    every layer-wise statistic is the tuned lens', the logit lens' of the same pass is kept beside it, and
    ``layers`` defaults to the lens' layers). ``lens_bootstrap`` > 0 adds block-bootstrap intervals of the
    per-layer correlations and KL, with that many resamples. ``manifold`` (True, or `ManifoldOptions`) adds each
    audited layer's hidden-state manifold statistics from the same pass (audit/manifold.py). ``readers`` are more
    `LayerReader`s fed by the same pass, at some of the audited layers (their rows join layers.json's).
    """
    check_audit_settings(margin_dtype, chunk_size, batch_size, lens_bootstrap)
    check_blocks_to_audit(blocks)
    check_block_fits(model, blocks.block_size)
    layer_list = audited_layers(model, blocks, layers, lens)
    if output_dir is not None:  # not created: it appears whole once written (_write_on_main_process)
        output_dir = files.check_output_dir(output_dir)
    sampler = manifold_reader(layer_list, int(blocks.position_mask().sum()), manifold, progress)
    all_readers = audit_readers(layer_list, None if lens is None else lens.translators, sampler, readers)
    positions = read_layers(
        model,
        blocks,
        all_readers,
        batch_size=batch_size,
        chunk_size=chunk_size,
        margin_dtype=margin_dtype,
        progress=progress,
    )
    layer_rows, apart = joined_rows(positions, all_readers, lens_bootstrap)
    summary = AuditSummary(
        provenance=_provenance(model, blocks, margin_dtype, provenance),
        **summarize_positions(positions),
        correct_wrong_gap=correct_wrong_gap(positions),
        layers=None if layer_rows is None else _layers_entry(layer_rows, all_readers, lens),
    )
    logit_rows = apart.get("logit_lens_layers")
    result = AuditResult(summary, positions, blocks, layer_rows, logit_layers=logit_rows)
    if output_dir is not None:
        _write_on_main_process(result, output_dir)
    return result


def audited_layers(
    model: torch.nn.Module, blocks: Blocks, layers: str | list[int] | None, lens: TunedLens | None
) -> list[int] | None:
    """The audited lens layers (None: no lens), a tuned lens' by default; a tuned lens is checked against the
    model, those layers and the blocks (it must not have been trained on them)."""
    n_layers = len(decoder_layers(model))
    if lens is None:
        return parse_layer_spec(layers, n_layers) if layers is not None else None
    layer_list = parse_layer_spec([*lens.layers, n_layers - 1] if layers is None else layers, n_layers)
    lens.check_model(model)
    lens.check_layers(layer_list, n_layers)
    lens.check_disjoint(blocks)
    return layer_list


def _provenance(model: torch.nn.Module, blocks: Blocks, margin_dtype: str, provenance: dict | None) -> dict[str, Any]:
    """audit.json's provenance: the caller's (model, arguments, versions), then the blocks' and the dtypes."""
    return {
        **(provenance or {}),
        "data_source": blocks.source,
        "block_size": blocks.block_size,
        "n_blocks": int(len(blocks.input_ids)),
        "blocks_sha256": blocks.fingerprint(),
        "tokenizer_sha256": blocks.tokenizer,
        "margin_dtype": margin_dtype,
        "model_dtype": str(output_head(model)[0].dtype).replace("torch.", ""),
    }


def _layers_entry(rows: list[dict], readers: Sequence[LayerReader], lens: TunedLens | None) -> dict[str, Any]:
    """audit.json's "layers": the lens' summary, each reader's entry (the manifold's sample and numbers), and for a
    tuned lens where it is and what it was trained on."""
    entry = layer_summary(rows, readers[0].name)
    for reader in readers:
        entry.update(reader.entry())
    if lens is not None:
        entry["lens_path"] = lens.config.get("path")
        entry["lens_training"] = {
            key: lens.config["training"][key] for key in ("data_source", "n_positions", "blocks_sha256")
        }
    return entry


def _write_on_main_process(result: AuditResult, output_dir: Path) -> None:
    """The main process writes the folder, staged beside it and swapped in whole (folders.swapped_folder: a kill at
    any moment leaves the old audit whole or the new one whole); under torch.distributed no rank goes on before it
    is complete."""
    from ..storage.folders import swapped_folder

    rank, world = process_rank_and_world()
    if rank == 0:  # every file an audit may write is replaced: a stale layers.json or mask.npy would describe another
        with swapped_folder(output_dir, replaced=(*WRITE_ORDER, AUDIT_MARKER), last=AUDIT_MARKER) as staging:
            written = write_audit(result, staging)
        result.files = {key: output_dir / path.name for key, path in written.items()}
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # no rank reads the folder before it is complete


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
        paths.update(_write_layers(result, result.layers, output_dir))
    files.write_json(paths["audit"], result.summary.to_json())  # last: its presence marks a complete audit
    result.files = paths
    return paths


def _write_layers(result: AuditResult, rows: list[dict], output_dir: Path) -> dict[str, Path]:
    """layers.json (the rows, the "layers" summary, a tuned lens' logit-lens rows) and the lens pictures."""
    entry = result.summary.layers
    if entry is None:
        raise ValueError("an AuditResult with layer rows needs its summary's layers entry (layer_summary)")
    paths = {"layers": output_dir / "layers.json", "layers_plot": output_dir / "layers.png"}
    extra = {} if result.logit_layers is None else {"logit_lens_layers": result.logit_layers}
    files.write_json(paths["layers"], {"layers": rows, **entry, **extra})
    plots.plot_layers(paths["layers_plot"], rows, entry["lens"])
    rows_by_lens: dict[str, Sequence[dict]] = (
        {"logit lens": rows} if result.logit_layers is None else {"logit lens": result.logit_layers, "tuned lens": rows}
    )
    paths.update(lens_plots.plot_lens_figures(output_dir, rows_by_lens))
    if "manifold" in entry:
        paths["manifold"] = output_dir / "manifold.png"
        manifold_plots.plot_manifold(paths["manifold"], {"audit": rows})
    return paths


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
