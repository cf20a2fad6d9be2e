"""Variant rows of a sweep: rows whose runs carry settings of their own, each paired with the control that makes
its difference mean something.

A variant is a name, an objective, its lambdas and the run fields it sets (any field of `hf-mrp refine`: model,
data, refine or MRPConfig / TrainingArguments). ``--variants`` gives them on the command line as
``NAME:OBJECTIVE:LAMBDA[:FIELD=VALUE...]`` (``ewc:fisher:0.6:mrp_ewc_lambda=1e5``); the W-trainable rows
(--head_lambdas) and the targeted rows (--target_lambdas) are variants too.

The control of a variant (one concept, `control_fields`): the same settings at lambda 0, without the settings that
only shape the objective's term (at lambda 0 they change nothing: the objective's own settings and the weights of
its positions). When nothing is left, or what is left trains nothing (``mrp_ce_weight=0``: at lambda 0 the loss is
zero, and the collapse check would rightly fail the run), the variant is paired with the sweep's main control.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from ...errors import MRPUserError
from ...ops import objective
from ...ops.settings import CONFIG_FIELDS
from ...training import MRPConfig
from ..arguments import DataArguments, ModelArguments
from ..parser import MRPArgumentParser
from ..refine_arguments import RefineArguments

HEAD = "head"  # the W-trainable rows (--head_lambdas): LoRA + lm_head, with their own CE-only control
TARGET = "target"  # the targeted rows (--target_lambdas): the objective aimed at --target_classes / --target_buckets
SPEC = "NAME:OBJECTIVE:LAMBDA[:FIELD=VALUE...]"
EXAMPLE = "ewc:fisher:0.6:mrp_ewc_lambda=1e5"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")  # a part of folder names: objective_NAME_lam0.6_seed0
# MRPSettings fields that still act at lambda 0 (the CE's weight and smoothing, its chunking and precision); every
# other loss setting shapes only the objective's term, as do the weights of its positions (the refine fields below).
ACTS_WITHOUT_OBJECTIVE = {"mrp_ce_weight", "label_smoothing_factor", "mrp_chunk_size", "mrp_logits_precision"}
OBJECTIVE_TERM_FIELDS = (set(CONFIG_FIELDS) - ACTS_WITHOUT_OBJECTIVE) | {
    "mrp_target_classes",
    "mrp_target_buckets",
    "mrp_untargeted_weight",
    "mrp_weighting",
}
# Fields that change no training, only the verdict on it: a variant setting only these needs no control of its own.
VERDICT_FIELDS = {"max_accuracy_drop"}
# Fields the sweep sets for every run: a variant names its objective and lambda in its spec, the seeds are --seeds.
SWEEP_FIELDS = {"mrp_objective", "mrp_lambda", "seed", "output_dir", "overwrite_output_dir", "resume_from_checkpoint"}


RUN_GROUPS = (ModelArguments, DataArguments, RefineArguments, MRPConfig)  # a run's arguments (runs.RunArguments)


class Variant(NamedTuple):
    name: str  # in its runs' folder names: <objective>_<name>_lam<L>_seed<S>, control_<name>_lam0_seed<S>
    objective: str
    lambdas: tuple[float, ...]
    settings: dict[str, Any]  # run field -> value (from --variants: converted as the field's flag converts it)
    label: str  # how its rows are named: "fisher (<label>)", "control (CE only, <label>)"


def settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key}={','.join(map(str, v)) if isinstance(v, list) else v}" for key, v in settings.items())


def parse_variant(text: str) -> Variant:
    """One ``--variants`` spec; a malformed one is refused in one line that shows the form."""

    def refuse(problem: str) -> MRPUserError:
        return MRPUserError(f"--variants {text!r}: {problem}; write {SPEC}, e.g. {EXAMPLE}")

    parts = text.split(":")
    if len(parts) < 3:
        raise refuse("a variant needs a name, an objective and a lambda")
    name, objective_name, lam, *pairs = parts
    if not NAME.fullmatch(name) or name in (HEAD, TARGET):
        raise refuse(f"the name {name!r} must be letters, digits, '.' or '-', and not {HEAD} or {TARGET}")
    try:
        objective(objective_name, flag="objective")
    except MRPUserError as error:
        raise refuse(str(error)) from None
    try:
        value = float(lam)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise refuse(f"lambda {lam!r} must be a number > 0 (its control at lambda 0 is added)")
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, setting = pair.partition("=")
        key = key.removeprefix("--")
        if not sep or not key or not setting:
            raise refuse(f"{pair!r} is not FIELD=VALUE")
        if key in SWEEP_FIELDS:
            raise refuse(f"{key} is set by the sweep for each run (objective and lambda in the spec, --seeds)")
        group = next((group for group in RUN_GROUPS if key in _field_names(group)), None)
        if group is None:
            raise refuse(f"{key} is no field of the runs (a flag of `hf-mrp refine --help`, without its dashes)")
        settings[key] = _converted(_flags(group)[key], setting, refuse)
    label = f"{name}: {', '.join(pair.removeprefix('--') for pair in pairs)}" if pairs else name
    return Variant(name, objective_name, (value,), settings, label)


def control_fields(variant: Variant) -> dict[str, Any] | None:
    """The settings of the variant's own control, or None: it is paired with the sweep's main control (see the
    module docstring)."""
    kept = {k: v for k, v in variant.settings.items() if k not in OBJECTIVE_TERM_FIELDS | VERDICT_FIELDS}
    if not kept or ("mrp_ce_weight" in kept and float(kept["mrp_ce_weight"]) == 0):
        return None
    return kept


def control_note(variant: Variant) -> str:
    """What the variant's rows are paired with, in words (results.json, results.md)."""
    if variant.settings and "mrp_ce_weight" in variant.settings and control_fields(variant) is None:
        return (
            "the plain CE-only control of the seed: at lambda 0 its settings train nothing (mrp_ce_weight=0), so "
            "the pair measures the variant against ordinary CE training"
        )
    if control_fields(variant) is None:
        return "the plain control of the seed (at lambda 0 its settings change nothing)"
    return f"its own control per seed: CE only with {settings_text(control_fields(variant) or {})}"


@functools.cache
def _flags(dataclass_type: type) -> dict[str, argparse.Action]:
    parser = MRPArgumentParser((dataclass_type,))
    return {action.dest: action for action in parser._actions}


def grouped_fields(groups: tuple[Any, ...], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """``settings`` sorted into ``groups`` (a run's argument dataclasses, RUN_GROUPS' order) by the field each
    names."""
    names = [{item.name for item in dataclasses.fields(group)} for group in groups]
    placed: list[dict[str, Any]] = [{} for _ in groups]
    for key, value in settings.items():
        placed[next(i for i, fields in enumerate(names) if key in fields)][key] = value
    return placed


@functools.cache
def _field_names(dataclass_type: type) -> set[str]:
    return {item.name for item in dataclasses.fields(dataclass_type) if item.init}


def _converted(action: argparse.Action, text: str, refuse: Callable[[str], MRPUserError]) -> Any:
    """``text`` as the field's flag converts it (a list flag: comma-separated values)."""
    many, convert = action.nargs in ("+", "*"), action.type if callable(action.type) else str
    try:
        values = [convert(part) for part in (text.split(",") if many else [text])]
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise refuse(f"{action.dest}={text!r}: {error}") from None
    if action.choices is not None and any(value not in action.choices for value in values):
        raise refuse(f"{action.dest}={text!r}: choose from {', '.join(map(str, action.choices))}")
    return values if many else values[0]


__all__ = [
    "HEAD",
    "TARGET",
    "Variant",
    "SPEC",
    "parse_variant",
    "control_fields",
    "control_note",
    "settings_text",
    "grouped_fields",
    "OBJECTIVE_TERM_FIELDS",
]
