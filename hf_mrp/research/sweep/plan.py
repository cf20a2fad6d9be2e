"""The plan of a sweep: which runs (objective x lambda x seed, the controls, the variants), their names and
settings, and the rows of the report they fall into."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .arguments import MATCHED_OBJECTIVE, SweepArguments

CONTROL = "control"
HEAD = "head"  # variant: the head W trains too (LoRA + lm_head), with its own CE-only control
TARGET = "target"  # variant: the objective aimed at the targets of --target_classes / --target_buckets


class RunSpec(NamedTuple):
    name: str
    objective: str  # the row it belongs to: an objective, or "control"
    lam: float
    seed: int
    train_objective: str  # what --mrp_objective gets (the control's objective has weight 0)
    variant: str = ""  # "", HEAD or TARGET (its RefineArguments fields: variant_fields)

    @property
    def control(self) -> bool:
        return self.objective == CONTROL


def format_lambda(lam: float) -> str:
    """Shortest exact decimal: 0.15, 1, 0.00001 (folder names, tables)."""
    return np.format_float_positional(float(lam), trim="-")


def run_name(objective: str, lam: float, seed: int, variant: str = "") -> str:
    return f"{objective}{'_' + variant if variant else ''}_lam{format_lambda(lam)}_seed{seed}"


def variant_fields(args: SweepArguments, variant: str) -> dict:
    """The RefineArguments fields that make a run of ``variant`` (none for a plain run)."""
    if variant == HEAD:
        return {"train_lm_head": True}
    if variant == TARGET:
        return {
            key: list(value)
            for key, value in (("mrp_target_classes", args.target_classes), ("mrp_target_buckets", args.target_buckets))
            if value
        }
    return {}


def control_name(spec: RunSpec) -> str:
    """The control of a run: CE only, same seed and adapter scope (a targeted run's is the plain control: at
    lambda 0 the objective weights change nothing)."""
    return run_name(CONTROL, 0.0, spec.seed, HEAD if spec.variant == HEAD else "")


def row_keys(args: SweepArguments) -> list[tuple[str, float, str]]:
    """(objective, lambda, variant) of every row, in report order: the control(s), objective x lambda (entropy
    on its own grid when given), then the W-trainable and targeted rows."""
    keys = [(CONTROL, 0.0, "")] + ([(CONTROL, 0.0, HEAD)] if args.head_lambdas else [])
    for objective in args.objectives:
        lambdas = args.entropy_lambdas if objective == MATCHED_OBJECTIVE and args.entropy_lambdas else args.lambdas
        keys += [(objective, lam, "") for lam in lambdas]
    keys += [(args.head_objective, lam, HEAD) for lam in args.head_lambdas]
    keys += [(args.target_objective, lam, TARGET) for lam in args.target_lambdas]
    return keys


def plan_runs(args: SweepArguments) -> list[RunSpec]:
    """Seed by seed (a whole dose-response curve per seed early), each seed's runs in row order."""
    plan = []
    for seed in args.seeds:
        for objective, lam, variant in row_keys(args):
            trained = args.control_objective if objective == CONTROL else objective  # the control's has weight 0
            plan.append(RunSpec(run_name(objective, lam, seed, variant), objective, lam, seed, trained, variant))
    return plan


def row_label(objective: str, lam: float, variant: str, args: SweepArguments) -> str:
    """How a row is named in reports: 'fisher', 'control (CE only, W trainable)', 'fisher (targeted: content, ...)'."""
    name = "control (CE only" if objective == CONTROL else objective
    detail = {
        HEAD: "W trainable",
        TARGET: "targeted: " + ", ".join(list(args.target_classes) + list(args.target_buckets)),
    }.get(variant)
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
    "variant_fields",
    "control_name",
    "row_keys",
    "plan_runs",
    "row_label",
]
