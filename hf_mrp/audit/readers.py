"""What an audit reads at layer L: one `LayerReader` per kind of reading (the logit lens, the tuned lens, the
hidden-state manifold), all fed by the audit's one forward pass per batch (collect.read_layers).

A reader says three things: what it needs of a batch's hidden states (``head_inputs``: states to send through the
output head, whose lens statistics it then gets in ``read``; or the states themselves, read in ``read``), how it
accumulates them (``begin_batch`` / ``read``, and ``finish`` once every batch ran, collectively under
torch.distributed), and what it emits (``rows``: per layer, the keys it adds to that layer's row of layers.json,
which the pictures and the trackers read; ``entry``: what it adds to audit.json's "layers"). A new reading is a
new subclass; the pass does not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import MRPUserError
from ..ops.lens import LENS_STATISTICS, AffineTranslators

Columns = dict[str, np.ndarray]
# all_gather of one reader's {layer: columns} in the single-process order (identity on one process)
GatherColumns = Callable[[dict[int, Columns]], dict[int, Columns]]


class BatchStates:
    """One batch's hidden states at its audited positions ([count x d] rows, in audit order).

    ``captured`` are the decoder layers' outputs [batch x time x d] (as the model has them), ``final`` the final
    hidden states after the final norm, ``norm`` the final norm. Every operation runs on the whole [batch x time]
    tensor before the audited positions are picked, as the lens math always did (same shapes, same bits).
    """

    def __init__(
        self,
        captured: dict[int, torch.Tensor],
        final: torch.Tensor,
        mask: torch.Tensor,
        last: int,
        norm: torch.nn.Module,
    ):
        self.captured, self.final, self.mask, self.last, self.norm = captured, final, mask, last, norm

    def at_positions(self, states: torch.Tensor) -> torch.Tensor:
        """[batch x time x d] -> the audited positions' rows [count x d]."""
        return states[:, :-1][self.mask]

    def hidden(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s hidden states as the model has them (the final layer's after the final norm, as
        ``output_hidden_states`` gives them)."""
        return self.at_positions(self.final if layer == self.last else self.captured[layer])

    def lens_input(self, layer: int, translators: AffineTranslators | None = None) -> torch.Tensor:
        """What a lens sends through the head: the final layer's own states, else the layer's through its
        translator (a tuned lens) and the final norm."""
        if layer == self.last:
            return self.at_positions(self.final)
        states = self.captured[layer]
        if translators is not None:
            states = translators.translate(layer, states)
        return self.at_positions(self.norm(states))


class LayerReader(ABC):
    """One kind of reading at the audited ``layers`` (see the module docstring)."""

    name = "reader"
    apart: str | None = None  # None: ``rows`` join each layer's row of layers.json; else its own list under this key

    def __init__(self, layers: Sequence[int]):
        self.layers = [int(layer) for layer in layers]
        self.kept_batch = False

    def begin_batch(self, start: int | None, count: int) -> None:
        """The next batch's audited positions are ``start .. start + count`` in audit order; None: a padding round
        (a sharded forward is collective) whose numbers must be discarded (``kept_batch`` says which)."""
        self.kept_batch = start is not None

    def head_inputs(self, states: BatchStates) -> dict[int, torch.Tensor]:
        """{layer: [count x d] states} to send through the output head (the lens statistics of ``read``)."""
        return {}

    @abstractmethod
    def read(self, states: BatchStates, head: dict[int, dict[str, torch.Tensor]]) -> None:
        """Accumulate one batch: its hidden states and the head's statistics of this reader's ``head_inputs``."""

    def finish(self, gather: GatherColumns, world: int) -> None:
        """Every batch ran (each process calls it: ``gather`` and other gatherings are collective)."""
        return None

    @abstractmethod
    def rows(self, positions: Columns, n_resamples: int) -> dict[int, dict[str, Any]]:
        """{layer: the keys this reader adds to the layer's row of layers.json}, from the final layer's per-position
        columns ``positions`` and ``n_resamples`` block-bootstrap resamples for intervals (0: none)."""

    def entry(self) -> dict[str, Any]:
        """What this reader adds to audit.json's "layers" entry (after ``rows``)."""
        return {}


class LensReader(LayerReader):
    """The logit lens (each layer through the final norm and W), or with ``translators`` the tuned lens (through
    the layer's trained affine translator first): the per-position lens columns (``LENS_STATISTICS``) of each
    layer, summarized into layers.json's lens rows (audit/layers.py)."""

    def __init__(self, layers: Sequence[int], translators: AffineTranslators | None = None, apart: str | None = None):
        super().__init__(layers)
        self.translators = translators
        self.name = "logit" if translators is None else "tuned"
        self.apart = apart
        self._parts: dict[int, dict[str, list[np.ndarray]]] = {layer: {} for layer in self.layers}
        self.columns: dict[int, Columns] = {}

    def head_inputs(self, states: BatchStates) -> dict[int, torch.Tensor]:
        return {layer: states.lens_input(layer, self.translators) for layer in self.layers}

    def read(self, states: BatchStates, head: dict[int, dict[str, torch.Tensor]]) -> None:
        if not self.kept_batch:
            return
        for layer, found in head.items():
            for name in LENS_STATISTICS:
                self._parts[layer].setdefault(name, []).append(found[name].cpu().numpy())

    def finish(self, gather: GatherColumns, world: int) -> None:
        local = {layer: {k: np.concatenate(v) for k, v in cols.items()} for layer, cols in self._parts.items() if cols}
        self.columns = gather(local)

    def rows(self, positions: Columns, n_resamples: int) -> dict[int, dict[str, Any]]:
        from .layers import summarize_layers

        rows = summarize_layers(self.columns, -positions["target_logprob"], positions["block"], n_resamples)
        return {row["layer"]: row for row in rows}


def lens_readers(layers: Sequence[int] | None, translators: AffineTranslators | None) -> list[LensReader]:
    """The lenses of an audit with ``layers``: the logit lens, or the tuned lens and the logit lens of the same
    forward pass beside it (for comparison: layers.json's "logit_lens_layers"); none without layers."""
    if not layers:
        return []
    if translators is None:
        return [LensReader(layers)]
    return [LensReader(layers, translators), LensReader(layers, apart="logit_lens_layers")]


def audit_readers(
    layer_list: list[int] | None,
    translators: AffineTranslators | None,
    manifold: LayerReader | None,
    extra: Sequence[LayerReader],
) -> list[LayerReader]:
    """The audit's readers: its lenses, the manifold's, and the caller's (at audited layers only)."""
    audited = set(layer_list or [])
    for reader in extra:
        if not isinstance(reader, LayerReader) or not reader.layers or not set(reader.layers) <= audited:
            raise MRPUserError(
                f"readers= takes LayerReader objects reading some of the audited layers ({sorted(audited)}), got "
                f"{type(reader).__name__} at {getattr(reader, 'layers', None)}; pass layers= covering them"
            )
    found = lens_readers(layer_list, translators)
    return [*found, *([manifold] if manifold is not None else []), *extra]


def joined_rows(
    positions: Columns, readers: Sequence[LayerReader], n_resamples: int
) -> tuple[list[dict] | None, dict[str, list[dict]]]:
    """(layers.json's rows: each reader's keys joined per layer, in reader order; None without a reader), and the
    rows of the readers kept ``apart`` under their key."""
    joined: dict[int, dict] = {}
    apart: dict[str, list[dict]] = {}
    for reader in readers:
        rows = reader.rows(positions, n_resamples)
        if reader.apart is not None:
            apart[reader.apart] = [rows[layer] for layer in sorted(rows)]
            continue
        for layer in sorted(rows):
            row = joined.setdefault(layer, {"layer": layer})
            clash = (set(row) & set(rows[layer])) - {"layer"}
            if clash:
                raise ValueError(f"the {reader.name} reader writes {sorted(clash)}, which another reader wrote")
            row.update(rows[layer])
    return ([joined[layer] for layer in sorted(joined)] if joined else None), apart
