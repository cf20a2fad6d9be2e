"""The hidden-state manifold of each audited layer, read in the audit's own pass (docs/spec.md, "Manifold
statistics"): the math is ``stats.manifold``'s; this keeps the sampled positions' hidden states while the audit's
forward passes run, gathers them in audit order across processes, and turns them into rows of layers.json.

The sample is drawn over the audited positions in audit order before any forward pass, from the count alone, so
every process knows which of its rows to keep and the gathered sample is the one a single process keeps: the
statistics of a sharded audit equal a one-process audit's exactly. Memory is bounded by the sample: at most
``positions`` rows per layer are kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import MRPUserError, require_number
from ..stats.manifold import VARIANCE_LEVELS, ManifoldSettings, manifold_statistics, sample_indices
from .readers import BatchStates, GatherColumns, LayerReader

# layers.json's manifold keys, in the order the picture and the card show them
MANIFOLD_STATISTICS = (
    "participation_ratio",
    "variance_dims",
    "intrinsic_dimension_twonn",
    "intrinsic_dimension_mle",
    "curvature",
)


@dataclass(frozen=True)
class ManifoldOptions:
    """How the manifold is sampled: at most ``positions`` audited positions (all of them, in audit order, when
    there are no more), drawn with ``seed``; ``k`` neighbours for the Levina-Bickel estimate."""

    positions: int = 4096
    k: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("positions", "k", "seed"):
            require_number(f"manifold_{name}", getattr(self, name), integer=True)
        if self.positions < 3 or self.k < 2 or self.seed < 0:
            raise MRPUserError(
                f"manifold_positions must be >= 3, manifold_k >= 2 and manifold_seed >= 0, got {self.positions}, "
                f"{self.k} and {self.seed}"
            )


def manifold_options(manifold: bool | ManifoldOptions | None) -> ManifoldOptions | None:
    """``True`` is the default options, ``False`` / None none."""
    if manifold is True:
        return ManifoldOptions()
    return manifold or None


class ManifoldReader(LayerReader):
    """Keeps the sampled positions' hidden states of each layer while the audit's batches run; once gathered, each
    layer's manifold statistics (rows of layers.json, audit.json's "manifold")."""

    name = "manifold"

    def __init__(self, layers: list[int], n_positions: int, options: ManifoldOptions, progress: bool = True):
        super().__init__(layers)
        self.options = options
        self.n_positions = n_positions
        self.progress = progress
        self.indices = sample_indices(n_positions, options.positions, options.seed)
        self.kept: dict[int, list[np.ndarray]] = {layer: [] for layer in self.layers}
        self.taken: list[np.ndarray] = []
        self.states: dict[int, np.ndarray] = {}
        self.found: dict[int, dict] = {}
        self._local: np.ndarray | None = None

    def begin_batch(self, start: int | None, count: int) -> None:
        super().begin_batch(start, count)
        if start is None:
            self._local = None
            return
        low, high = np.searchsorted(self.indices, [start, start + count])
        self._local = self.indices[low:high] - start
        self.taken.append(self.indices[low:high])

    def read(self, states: BatchStates, head: dict[int, dict[str, torch.Tensor]]) -> None:
        for layer in self.layers:
            self.take(layer, states.hidden(layer))

    def take(self, layer: int, states: torch.Tensor) -> None:
        """Keep ``layer``'s states [count x hidden] at this batch's sampled positions (16-bit widened to float32,
        which is exact)."""
        if self._local is None or self._local.size == 0:
            return
        kept = states[torch.as_tensor(self._local, device=states.device)].detach()
        if kept.dtype in (torch.bfloat16, torch.float16):
            kept = kept.float()
        self.kept[layer].append(kept.cpu().numpy())

    def finish(self, gather: GatherColumns, world: int) -> None:
        self.states = self.gathered(world)

    def gathered(self, world: int) -> dict[int, np.ndarray]:
        """{layer: [sample x hidden]} in sample order, every process's rows gathered (a collective call)."""
        taken = np.concatenate(self.taken) if self.taken else np.zeros(0, np.int64)
        rows = {layer: np.concatenate(parts) if parts else None for layer, parts in self.kept.items()}
        if world > 1:
            import torch.distributed as dist

            shards: list[Any] = [None] * world
            dist.all_gather_object(shards, (taken, rows))
            shards = [shard for shard in shards if shard[0].size]
            taken = np.concatenate([shard[0] for shard in shards])
            rows = {layer: np.concatenate([shard[1][layer] for shard in shards]) for layer in self.kept}
        if not np.array_equal(np.sort(taken), self.indices):
            raise RuntimeError("the manifold sample was not read whole: some sampled position was never audited")
        order = np.argsort(taken, kind="stable")
        return {layer: states[order] for layer, states in rows.items() if states is not None}

    def rows(self, positions: dict[str, np.ndarray], n_resamples: int) -> dict[int, dict[str, Any]]:
        self.found = manifold_rows(self, self.states, self.progress)
        return self.found

    def entry(self) -> dict[str, Any]:
        return {"manifold": manifold_entry(self, self.found)}


def manifold_rows(sampler: ManifoldReader, states: dict[int, np.ndarray], progress: bool = True) -> dict[int, dict]:
    """{layer: its manifold statistics}, one progress bar over every layer's nearest-neighbour rows."""
    settings = ManifoldSettings(k=sampler.options.k)
    total = sum(len(points) for points in states.values())
    found = {}
    with tqdm(total=total, desc="manifold", unit="point", disable=not progress) as bar:
        for layer, points in sorted(states.items()):
            done = bar.n
            found[layer] = manifold_statistics(points, settings, bar.update)
            bar.update(len(points) - (bar.n - done))  # repeated points have no neighbour rows: counted here
    return found


def manifold_entry(sampler: ManifoldReader, rows: dict[int, dict]) -> dict[str, Any]:
    """audit.json's "manifold" (under "layers"): how the sample was drawn and each layer's headline numbers."""
    return {
        **asdict(sampler.options),
        "audited_positions": sampler.n_positions,
        "sampled_positions": int(sampler.indices.size),
        "sampled": bool(sampler.indices.size < sampler.n_positions),
        "by_layer": [{"layer": layer, **headline(row)} for layer, row in sorted(rows.items())],
    }


def headline(row: dict) -> dict[str, float | None]:
    """The scalar manifold numbers of a layer row: each statistic, variance_dims as variance_dims_<level>."""
    found: dict[str, float | None] = {}
    for name in MANIFOLD_STATISTICS:
        if name == "variance_dims":
            dims = row.get(name) or {}
            found.update({f"variance_dims_{level}": dims.get(str(level)) for level in VARIANCE_LEVELS})
        else:
            found[name] = row.get(name)
    return found


def manifold_reader(
    layers: list[int] | None, n_positions: int, manifold: bool | ManifoldOptions | None, progress: bool = True
) -> ManifoldReader | None:
    """The reader of an audit asked for the manifold (None: not asked); it reads the audited layers."""
    options = manifold_options(manifold)
    if options is None:
        return None
    if not layers:
        raise MRPUserError(
            "the manifold statistics are per audited layer: pass the layers too (--layers / --audit_layers, e.g. "
            "'all' or '20-29'; layers= in Python)"
        )
    return ManifoldReader(layers, n_positions, options, progress)
