"""The plan of a sweep: which runs (objective x lambda x seed, the controls, the variants), their names and
settings, and the rows of the report they fall into."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ...errors import MRPUserError
from .arguments import SweepArguments
from .variants import HEAD, TARGET, Variant, control_fields, parse_variant

CONTROL = "control"


class RunSpec(NamedTuple):
    name: str
    objective: str  # the row it belongs to: an objective, or "control"
    lam: float
    seed: int
    train_objective: str  # what --mrp_objective gets (the control's objective has weight 0)
    variant: str = ""  # "" or a variant's name (variants.Variant; its fields: run_fields)
    control_run: str = ""  # the run it is paired with ("" for a control)

    @property
    def control(self) -> bool:
        return self.objective == CONTROL


def format_lambda(lam: float) -> str:
    """Shortest exact decimal: 0.15, 1, 0.00001 (folder names, tables)."""
    return np.format_float_positional(float(lam), trim="-")


def run_name(objective: str, lam: float, seed: int, variant: str = "") -> str:
    return f"{objective}{'_' + variant if variant else ''}_lam{format_lambda(lam)}_seed{seed}"


def sweep_variants(args: SweepArguments) -> list[Variant]:
    """The variants of the sweep, in report order: the W-trainable rows, the targeted rows, then --variants."""
    found = []
    if args.head_lambdas:
        found.append(
            Variant(HEAD, args.head_objective, tuple(args.head_lambdas), {"train_lm_head": True}, "W trainable")
        )
    if args.target_lambdas:
        targets = [*args.target_classes, *args.target_buckets]
        settings = {
            key: list(value)
            for key, value in (("mrp_target_classes", args.target_classes), ("mrp_target_buckets", args.target_buckets))
            if value
        }
        found.append(
            Variant(
                TARGET, args.target_objective, tuple(args.target_lambdas), settings, "targeted: " + ", ".join(targets)
            )
        )
    return found + [parse_variant(text) for text in args.variants]


def variant_fields(args: SweepArguments, variant: str) -> dict:
    """The run fields of ``variant``'s runs (none for a plain run)."""
    return next((dict(v.settings) for v in sweep_variants(args) if v.name == variant), {})


def run_fields(args: SweepArguments, spec: RunSpec) -> dict:
    """The run fields ``spec`` trains with: its variant's, or for a variant's own control those of control_fields."""
    found = next((v for v in sweep_variants(args) if v.name == spec.variant), None)
    if found is None:
        return {}
    return dict(control_fields(found) or {}) if spec.control else dict(found.settings)


def row_keys(args: SweepArguments) -> list[tuple[str, float, str]]:
    """(objective, lambda, variant) of every row, in report order: the main control and the variants' own
    controls, objective x lambda (each objective on its grid: SweepArguments.lambdas_of), then the variant rows."""
    variants = sweep_variants(args)
    keys = [(CONTROL, 0.0, "")] + [(CONTROL, 0.0, v.name) for v in variants if control_fields(v) is not None]
    for objective in args.objectives:
        keys += [(objective, lam, "") for lam in args.lambdas_of(objective)]
    keys += [(v.objective, lam, v.name) for v in variants for lam in v.lambdas]
    return keys


def plan_runs(args: SweepArguments) -> list[RunSpec]:
    """Seed by seed (a whole dose-response curve per seed early), each seed's runs in row order; each run names the
    control it is paired with (a variant's own, else the main one)."""
    own = {v.name for v in sweep_variants(args) if control_fields(v) is not None}
    plan = []
    for seed in args.seeds:
        for objective, lam, variant in row_keys(args):
            name = run_name(objective, lam, seed, variant)
            if objective == CONTROL:  # the control's objective has weight 0
                plan.append(RunSpec(name, objective, lam, seed, args.control_objective, variant))
                continue
            control = run_name(CONTROL, 0.0, seed, variant if variant in own else "")
            plan.append(RunSpec(name, objective, lam, seed, objective, variant, control))
    names = [spec.name for spec in plan]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise MRPUserError(f"two rows of the sweep make the runs {', '.join(twice)}; give each variant its own name")
    return plan


def row_label(objective: str, lam: float, variant: str, args: SweepArguments) -> str:
    """How a row is named in reports: 'fisher', 'control (CE only, W trainable)', 'fisher (targeted: content, ...)'."""
    name = "control (CE only" if objective == CONTROL else objective
    detail = next((v.label for v in sweep_variants(args) if v.name == variant), None) if variant else None
    if objective == CONTROL:
        return name + (f", {detail})" if detail else ")")
    return name + (f" ({detail})" if detail else "")


__all__ = [
    "CONTROL",
    "HEAD",
    "TARGET",
    "RunSpec",
    "format_lambda",
    "run_name",
    "sweep_variants",
    "variant_fields",
    "run_fields",
    "row_keys",
    "plan_runs",
    "row_label",
]
