"""The registry of MRP objectives: one record per objective, and the one door a penalty is called through.

An objective is a per-position penalty P_t of one chunk of positions; the loss is CE + lambda * sum_t P_t over the
valid positions (divided as `MRPSettings.normalization` says). What a penalty reads is declared in its record, so
the fused loss (`chunk_loss.py`) hands it exactly that and nothing bigger: the top-k float32 logits with their
token ids and targets (`TopK`), the k rows of the head's W (``rows=True``), or the chunk's whole float32 logits
(``full_logits=True``). The fused loss, the configs' choices and help, the audit, the command line and the docs
table all read this registry: no other module compares objective names.

Growing it: an objective that reads something else is a new `Objective` field saying so (its default keeps every
record as it is) and the fused loss handing that input through the same `evaluate` door, as ``layers`` does for
the released ``depth`` and ``combined``: their record says "also the target layers' logits", and the fused loss
runs ``mrp_depth_objective``'s record there. A loss term beside the objective (EWC) is the trainer's, added to the
fused sums' ``total``, not a record.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from ...errors import MRPUserError


@dataclass(frozen=True)
class TopK:
    """One chunk of N positions as a penalty sees it; every tensor is float32 under any autocast or model dtype.

    ``values`` [N, k] the k largest logits the model emits, sorted descending (differentiable), ``indices`` [N, k]
    their token ids, ``target`` [N] the target ids, ``target_logit`` [N] the target's logit (differentiable),
    ``correct`` [N] bool (top-1 is the target), ``tau`` the margin threshold (``mrp_margin_threshold``). With
    ``rows=True``: ``rows`` [N, k, d] the k rows of the head's W' (W times the model's logit scale;
    differentiable). With ``full_logits=True``: ``logits`` [N, V] the chunk's logits (differentiable)."""

    values: torch.Tensor
    indices: torch.Tensor
    target: torch.Tensor
    target_logit: torch.Tensor
    correct: torch.Tensor
    tau: float
    rows: torch.Tensor | None = None
    logits: torch.Tensor | None = None


PenaltyOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
Penalty = Callable[[TopK], PenaltyOutput]


class ClosedForm(Protocol):
    """A full-logits objective computed inside the fused loss' own logits buffer, its gradient in closed form (no
    autograd over [chunk x V]): the speed path of a built-in. ``parts`` is the chunk's `margins.ChunkSoftmax`."""

    def values(self, parts: Any) -> torch.Tensor:
        """The per-position penalty [N] from the chunk's softmax pieces (read before the buffer is overwritten)."""
        ...

    def gradient_(
        self, exp: torch.Tensor, parts: Any, values: torch.Tensor, scale: Any, ce_weight: float, inv_total: Any
    ) -> torch.Tensor:
        """Turn ``exp`` (exp(z - max), [N, V], in place) into ce_weight * p + scale * dP/dz, where the softmax
        p = exp x ``inv_total`` ([N, 1]: 1 / S, 0 on ignored rows): folding 1 / S into the objective's own factor
        saves the softmax's separate pass over the chunk. Returns ``exp``."""
        ...


@dataclass(frozen=True)
class Objective:
    """One registered objective: its ``name``; what its ``penalty`` reads (``top_k`` logits, None: the config's
    ``mrp_top_k``; the k ``rows`` of W; the ``full_logits``); whether it is ``gated`` (the penalty returns
    (values, gate), and ``mrp_margin_normalization="gated"`` divides the sum by the gated positions, as the
    paper's margin objective does); a one-line ``description`` (configs' help, docs table); and for built-ins
    an optional ``closed_form`` (the fused loss' speed path), ``memory`` (bytes per position at k, refused
    when a chunk would not fit) and ``layers``: the objective also reads the logits of the layers
    ``mrp_target_layers`` (through ``mrp_depth_lens``) and adds ``mrp_depth_objective`` averaged over them (the
    released ``depth`` / ``combined``); such a record's own ``penalty`` (None: none) acts on the final layer."""

    name: str
    penalty: Penalty | None
    top_k: int | None = None
    rows: bool = False
    full_logits: bool = False
    gated: bool = False
    description: str = ""
    builtin: bool = False
    closed_form: ClosedForm | None = None
    memory: Callable[[int], int] | None = None
    layers: bool = False

    def k(self, configured: int) -> int:
        """The number of top logits this objective reads, given the config's ``mrp_top_k``."""
        return configured if self.top_k is None else self.top_k

    def reads(self) -> str:
        """What the penalty reads, in words (the docs table, the config help)."""
        parts = ["top-k logits" if self.top_k is None else f"top-{self.top_k} logits"] * (self.penalty is not None)
        parts += ["W rows"] * self.rows + ["full logits"] * self.full_logits
        parts += ["target layers' logits (mrp_depth_objective)"] * self.layers
        return " + ".join(parts)


_REGISTRY: dict[str, Objective] = {}


def register_objective(
    name: str,
    penalty: Penalty,
    *,
    top_k: int | None = None,
    rows: bool = False,
    full_logits: bool = False,
    gated: bool = False,
    description: str = "",
) -> Objective:
    """Register ``penalty`` as the objective ``name`` (usable as ``mrp_objective`` from then on, in every config,
    command and sweep of this process).

    Args:
        name: the ``mrp_objective`` value; a user name may be registered again (re-running a cell replaces it), a
            built-in's may not.
        penalty: ``penalty(top: TopK) -> values`` [N] float32, one penalty per position (minimized), or
            ``(values, gate)`` with ``gate`` [N] bool when ``gated``; differentiable in ``top.values``,
            ``top.target_logit``, ``top.rows`` and ``top.logits``.
        top_k: how many top logits ``top.values`` holds; None: the config's ``mrp_top_k``.
        rows: also hand the penalty ``top.rows``, the k rows of W' [N, k, d].
        full_logits: also hand it ``top.logits``, the chunk's [N, V] float32 logits (exact; costs one autograd
            pass over [chunk x V] per chunk).
        gated: the penalty returns ``(values, gate)``; values outside the gate count 0, and under
            ``mrp_margin_normalization="gated"`` the sum is divided by the gated positions.
        description: one line for the configs' help and the docs.

    Returns:
        The record (an `Objective`).
    """
    record = Objective(name, penalty, top_k, rows, full_logits, gated, description)
    _check_record(record)
    existing = _REGISTRY.get(name)
    if existing is not None and existing.builtin:
        raise MRPUserError(f"objective {name!r} is built in; register yours under another name")
    _REGISTRY[name] = record
    return record


def register_builtin(record: Objective) -> None:
    """The built-ins' door (builtin.py): the same checks, marked as built in."""
    record = replace(record, builtin=True)
    _check_record(record)
    _REGISTRY[record.name] = record


def _check_record(record: Objective) -> None:
    name = record.name
    if not isinstance(name, str) or not name or not name.replace("_", "a").replace("-", "a").isalnum():
        raise MRPUserError(
            f"an objective's name must be a word such as 'hinge' (letters, digits, _ or -), got {name!r}"
        )
    if not callable(record.penalty) and not (record.penalty is None and record.layers and record.builtin):
        raise MRPUserError(f"objective {name!r}: the penalty must be a function of one TopK, got {record.penalty!r}")
    k = record.top_k
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise MRPUserError(f"objective {name!r}: top_k must be a positive integer or None (mrp_top_k), got {k!r}")
    for flag in ("rows", "full_logits", "gated", "layers"):
        if not isinstance(getattr(record, flag), bool):
            raise MRPUserError(f"objective {name!r}: {flag} must be True or False, got {getattr(record, flag)!r}")


def objective(name: str, flag: str = "mrp_objective") -> Objective:
    """The record of ``name``; an unknown name is refused in one line, naming ``flag``, that lists the registered
    ones."""
    record = _REGISTRY.get(name) if isinstance(name, str) else None
    if record is None:
        raise MRPUserError(
            f"unknown {flag} {name!r}; choose one of {', '.join(_REGISTRY)} (or register yours: "
            "hf_mrp.register_objective, --objectives_module PATH.py)"
        )
    return record


def objective_names() -> tuple[str, ...]:
    """Every registered name, built-ins first, in registration order."""
    return tuple(_REGISTRY)


def objectives_help() -> str:
    """The configs' help for ``mrp_objective``, read from the registry when asked (user objectives included)."""
    described = "; ".join(
        f"'{r.name}' ({r.description})" if r.description else f"'{r.name}'" for r in _REGISTRY.values()
    )
    return f"Objective added to cross-entropy: {described}. Add yours with hf_mrp.register_objective."


def load_objectives_module(path: str) -> None:
    """Import a user's file of objectives (``--objectives_module PATH.py``): its ``register_objective`` calls run."""
    file = Path(path)
    if not file.is_file() or file.suffix != ".py":
        raise MRPUserError(f"--objectives_module {path}: no such Python file (pass the path of a .py file)")
    name = f"hf_mrp_user_objectives_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None  # a .py file always has a source loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def evaluate(record: Objective, top: TopK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``record``'s penalty on ``top``, checked: (values [N] float32, zero outside the gate; the gate [N] bool or
    None). A wrong shape, dtype or return form is refused in one line naming the objective."""
    assert record.penalty is not None  # the fused loss calls no penalty-less record
    out = record.penalty(top)
    if isinstance(out, tuple) != record.gated:
        fix = (
            "register it with gated=True, or return the values alone"
            if isinstance(out, tuple)
            else "return (values, gate), or register it without gated=True"
        )
        got = "a (values, gate) pair" if isinstance(out, tuple) else "values alone"
        raise MRPUserError(f"objective {record.name!r}: its penalty returned {got}; {fix}")
    if isinstance(out, tuple) and len(out) != 2:
        raise MRPUserError(f"objective {record.name!r}: a gated penalty returns (values, gate), got {len(out)} items")
    values, gate = out if isinstance(out, tuple) else (out, None)
    n = top.values.shape[0]
    _check_output(record.name, "penalty", values, n, torch.float32)
    if gate is None:
        return values, None
    _check_output(record.name, "gate", gate, n, torch.bool)
    return torch.where(gate, values, torch.zeros_like(values)), gate


def _check_output(name: str, what: str, value: object, n: int, dtype: torch.dtype) -> None:
    if not isinstance(value, torch.Tensor):
        raise MRPUserError(f"objective {name!r}: its {what} must be a torch.Tensor [{n}], got {type(value).__name__}")
    if tuple(value.shape) != (n,):
        raise MRPUserError(
            f"objective {name!r}: its {what} has shape {tuple(value.shape)}, expected ({n},): one value per "
            f"position of the chunk"
        )
    if value.dtype != dtype:
        raise MRPUserError(f"objective {name!r}: its {what} has dtype {value.dtype}, expected {dtype}")


def penalty_column(name: str, top: TopK) -> torch.Tensor:
    """The per-position penalty of the registered objective ``name`` (0 outside its gate), detached: what the audit
    and the lens record. ``top`` may hold more top logits than the objective reads."""
    record = objective(name)
    if record.penalty is None:  # a record that reads only other layers' logits: nothing at this one
        return torch.zeros_like(top.target_logit).detach()
    k = record.k(top.values.shape[1])
    sliced = replace(top, values=top.values[:, :k], indices=top.indices[:, :k])
    if record.rows and top.rows is not None:
        sliced = replace(sliced, rows=top.rows[:, :k])
    return evaluate(record, sliced)[0].detach()


def objectives_table() -> str:
    """The registered objectives as the markdown table of docs/objectives.md (a test keeps the two equal)."""
    lines = [
        "| objective | reads | gated | what the penalty does (CE + lambda x penalty is minimized) |",
        "|---|---|---|---|",
    ]
    for record in _REGISTRY.values():
        lines.append(
            f"| `{record.name}` | {record.reads()} | {'yes' if record.gated else 'no'} | {record.description} |"
        )
    return "\n".join(lines)
