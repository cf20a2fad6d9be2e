"""What `hf-mrp sweep` parses itself (SweepArguments); every other flag passes through to each run."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ...errors import MRPUserError
from ...ops import objective, objective_names
from ...ops.targeting import check_targets
from ...stats.token_classes import BUCKETS, CLASSES
from .variants import parse_variant

logger = logging.getLogger(__name__)

DEFAULT_AUDIT_BLOCKS = 64
# The report's matched pair (docs/spec.md, "Geometry or sharpening"): the objective with its own lambda grid
# (--entropy_lambdas) whose lambdas are matched, on median margin change, to each lambda of the reference.
REFERENCE_OBJECTIVE, MATCHED_OBJECTIVE = "fisher", "entropy"
# Flags the sweep sets for each run (flag -> the sweep flag to use instead).
RESERVED_FLAGS = {
    "--mrp_objective": "--objectives (and --control_objective)",
    "--mrp_lambda": "--lambdas",
    "--seed": "--seeds",
    "--push_to_hub": "nothing: a sweep does not push; push a chosen run folder afterwards",
    "--hub_model_id": "nothing: a sweep does not push; push a chosen run folder afterwards",
    "--resume_from_checkpoint": "nothing: rerun the same command; finished runs are kept, unfinished ones redone",
    "--overwrite_output_dir": "a new --output_dir (or delete a run's folder under runs/ to redo it)",
    "--train_lm_head": "--head_lambdas (W-trainable rows, with their own controls)",
    "--mrp_target_classes": "--target_lambdas with --target_classes",
    "--mrp_target_buckets": "--target_lambdas with --target_buckets",
}


@dataclass
class SweepArguments:
    """What `hf-mrp sweep` itself parses; every other flag passes through to each run."""

    output_dir: str = field(default="outputs/sweep", metadata={"help": "the sweep folder"})
    objectives: list[str] = field(
        default_factory=lambda: ["margin", "fisher", "entropy"],
        metadata={
            "help": f"registered objectives ({', '.join(objective_names())}, and those of --objectives_module PATH.py)"
        },
    )
    lambdas: list[float] = field(
        default_factory=lambda: [0.15, 0.3, 0.6, 1.0],
        metadata={"help": "objective weights > 0; the lambda = 0 control is always added"},
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "training seeds"})
    n_bootstrap: int = field(
        default=1000, metadata={"help": "block-bootstrap resamples for the confidence intervals; 0: none"}
    )
    confidence: float = field(default=0.95, metadata={"help": "confidence level of the intervals"})
    bootstrap_seed: int = field(default=0, metadata={"help": "rng seed of the bootstrap"})
    control_objective: str = field(
        default="fisher",
        metadata={
            "help": "objective name the control carries at weight 0 (MRPConfig needs one; the loss is plain "
            "cross-entropy either way)"
        },
    )
    aggregate_only: bool = field(
        default=False, metadata={"help": "train nothing: recompute the results from the runs already finished"}
    )
    entropy_lambdas: list[float] | None = field(
        default=None,
        metadata={
            "help": "entropy's own lambda grid (default: --lambdas); the report matches each fisher lambda "
            "with the entropy lambda of the closest median margin change"
        },
    )
    objective_lambdas: list[str] = field(
        default_factory=list,
        metadata={"help": "an objective's own lambda grid instead of --lambdas, as OBJECTIVE=L[,L...] (margin=0.3,1)"},
    )
    variants: list[str] = field(
        default_factory=list,
        metadata={
            "help": "rows with settings of their own, as NAME:OBJECTIVE:LAMBDA[:FIELD=VALUE...] (any `hf-mrp refine` "
            "field, e.g. ewc:fisher:0.6:mrp_ewc_lambda=1e5), each paired with its settings at lambda 0, or with the "
            "main control where those change or train nothing (docs/experiments.md)"
        },
    )
    grids: dict[str, list[float]] = field(default_factory=dict, init=False)  # from --objective_lambdas
    head_lambdas: list[float] = field(
        default_factory=list,
        metadata={
            "help": "rows with the head W trainable too (--train_lm_head: LoRA + lm_head) at these lambdas, "
            "each seed with its own CE-only control of the same scope"
        },
    )
    head_objective: str = field(default="fisher", metadata={"help": "objective of the W-trainable rows"})
    target_lambdas: list[float] = field(
        default_factory=list,
        metadata={
            "help": "targeted rows: the objective weighted to the targets of --target_classes / "
            "--target_buckets, at these lambdas"
        },
    )
    target_objective: str = field(default="fisher", metadata={"help": "objective of the targeted rows"})
    target_classes: list[str] = field(
        default_factory=lambda: ["content", "entity"],
        metadata={
            "help": f"token classes the targeted rows aim at ({', '.join(CLASSES)}); the flag alone: no class",
            "nargs": "*",
        },
    )
    target_buckets: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"frequency buckets the targeted rows aim at ({', '.join(BUCKETS)}); none given: any bucket",
            "nargs": "*",
        },
    )
    audit_blocks: int = field(
        default=DEFAULT_AUDIT_BLOCKS,
        metadata={
            "help": "blocks audited before/after every run, unless --audit_positions is passed (64: about "
            "16K positions at --block_size 256)"
        },
    )

    ray_address: str | None = field(
        default=None,
        metadata={
            "help": "the Ray cluster to run on (default: $RAY_ADDRESS; neither: a local Ray started in this "
            "process on this machine's CPUs and GPUs)"
        },
    )
    cpus_per_run: float = field(default=1.0, metadata={"help": "CPUs each run holds (split over its processes)"})
    gpus_per_run: float | None = field(
        default=None,
        metadata={"help": "GPUs each run holds (split over its processes); default: 1 on a cluster with GPUs, else 0"},
    )
    processes_per_run: int = field(
        default=1, metadata={"help": "processes of one run (> 1: a Ray Train TorchTrainer, DDP; gloo on CPU)"}
    )
    max_concurrent_runs: int = field(
        default=0, metadata={"help": "runs at a time at most (0: as many as the resources allow)"}
    )

    def __post_init__(self) -> None:
        self.objectives = list(dict.fromkeys(self.objectives))
        self.seeds = [int(seed) for seed in dict.fromkeys(self.seeds)]
        for name in self.objectives + [self.control_objective, self.head_objective, self.target_objective]:
            objective(name, flag="objective")  # an unknown name: one line listing the registered ones
        self.lambdas = _positive_lambdas(self.lambdas, "--lambdas")
        if self.entropy_lambdas is not None:
            self.entropy_lambdas = _positive_lambdas(self.entropy_lambdas, "--entropy_lambdas")
        self.grids = _objective_grids(self.objective_lambdas, self.objectives)
        names = [parse_variant(text).name for text in self.variants]  # a malformed spec: one line
        if len(set(names)) < len(names):
            raise MRPUserError(f"--variants: each variant needs its own name, got {', '.join(names)}")
        self.head_lambdas = _positive_lambdas(self.head_lambdas, "--head_lambdas")
        self.target_lambdas = _positive_lambdas(self.target_lambdas, "--target_lambdas")
        if not self.objectives or not self.lambdas or not self.seeds:
            raise MRPUserError("a sweep needs at least one objective, one lambda > 0 and one seed")
        try:
            check_targets(self.target_classes, self.target_buckets)
        except ValueError as error:
            raise MRPUserError(f"{error} (--target_classes / --target_buckets)") from None
        if self.target_lambdas and not (self.target_classes or self.target_buckets):
            raise MRPUserError("--target_lambdas needs --target_classes or --target_buckets (what to aim at)")
        if self.audit_blocks < 1:
            raise MRPUserError(f"audit_blocks must be positive, got {self.audit_blocks}")
        self._check_resources()
        if self.n_bootstrap < 0:
            raise MRPUserError(f"n_bootstrap must be >= 0 (0: no confidence intervals), got {self.n_bootstrap}")
        if not 0 < self.confidence < 1:
            raise MRPUserError(f"confidence must be between 0 and 1, got {self.confidence}")

    def _check_resources(self) -> None:
        if not self.cpus_per_run >= 0.1:
            raise MRPUserError(f"--cpus_per_run must be at least 0.1, got {self.cpus_per_run}")
        if self.gpus_per_run is not None and not self.gpus_per_run >= 0:
            raise MRPUserError(f"--gpus_per_run must be >= 0, got {self.gpus_per_run}")
        if self.processes_per_run < 1:
            raise MRPUserError(f"--processes_per_run must be >= 1, got {self.processes_per_run}")
        if self.max_concurrent_runs < 0:
            raise MRPUserError(
                f"--max_concurrent_runs must be >= 0 (0: as resources allow), got {self.max_concurrent_runs}"
            )

    def lambdas_of(self, name: str) -> list[float]:
        """The lambda grid of an objective of --objectives: --objective_lambdas, entropy's --entropy_lambdas, or
        --lambdas."""
        if name in self.grids:
            return self.grids[name]
        return self.entropy_lambdas if name == MATCHED_OBJECTIVE and self.entropy_lambdas else self.lambdas


def _objective_grids(specs: Sequence[str], objectives: Sequence[str]) -> dict[str, list[float]]:
    grids = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or name not in objectives:
            raise MRPUserError(
                f"--objective_lambdas {spec!r}: write OBJECTIVE=L[,L...] for an objective of --objectives "
                f"({', '.join(objectives)})"
            )
        try:
            grids[name] = _positive_lambdas(
                [float(value) for value in values.split(",")], f"--objective_lambdas {name}"
            )
        except ValueError:
            raise MRPUserError(
                f"--objective_lambdas {spec!r}: the lambdas must be numbers, e.g. margin=0.3,1"
            ) from None
        if not grids[name]:
            raise MRPUserError(f"--objective_lambdas {spec!r}: give at least one lambda > 0")
    return grids


def _positive_lambdas(values, flag: str) -> list[float]:
    lambdas = [float(lam) for lam in dict.fromkeys(float(lam) for lam in values)]
    bad = [lam for lam in lambdas if not (np.isfinite(lam) and lam >= 0)]
    if bad:
        raise MRPUserError(f"{flag} must be finite and >= 0, got {bad}")
    if 0.0 in lambdas:
        logger.warning("lambda 0 is the control every seed gets; dropping it from %s", flag)
    return sorted(lam for lam in lambdas if lam > 0)


def check_pass_through(refine_argv: Sequence[str]) -> None:
    """Refuse a pass-through flag that the sweep sets for each run, naming the sweep flag to use instead."""
    for token in refine_argv:
        flag = token.split("=", 1)[0]
        if flag in RESERVED_FLAGS:
            raise MRPUserError(f"{flag} is set by the sweep for each run; use {RESERVED_FLAGS[flag]}")


__all__ = ["SweepArguments", "RESERVED_FLAGS", "check_pass_through"]
