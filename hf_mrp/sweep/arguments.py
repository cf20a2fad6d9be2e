"""What `hf-mrp sweep` parses itself (SweepArguments); every other flag passes through to each run."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import MRPUserError
from ..ops import OBJECTIVES
from ..ops.targeting import check_targets
from ..parser import MRPArgumentParser
from ..stats.token_classes import BUCKETS, CLASSES

logger = logging.getLogger(__name__)

DEFAULT_AUDIT_BLOCKS = 64
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

    output_dir: str = "outputs/sweep"
    objectives: list[str] = field(default_factory=lambda: ["margin", "fisher", "entropy"])
    lambdas: list[float] = field(default_factory=lambda: [0.15, 0.3, 0.6, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_bootstrap: int = 1000
    confidence: float = 0.95
    bootstrap_seed: int = 0
    control_objective: str = "fisher"
    aggregate_only: bool = False
    entropy_lambdas: list[float] | None = None
    head_lambdas: list[float] = field(default_factory=list)
    head_objective: str = "fisher"
    target_lambdas: list[float] = field(default_factory=list)
    target_objective: str = "fisher"
    target_classes: list[str] = field(default_factory=lambda: ["content", "entity"])
    target_buckets: list[str] = field(default_factory=list)
    audit_blocks: int = DEFAULT_AUDIT_BLOCKS

    def __post_init__(self) -> None:
        self.objectives = list(dict.fromkeys(self.objectives))
        self.seeds = [int(seed) for seed in dict.fromkeys(self.seeds)]
        for name in self.objectives + [self.control_objective, self.head_objective, self.target_objective]:
            if name not in OBJECTIVES:
                raise MRPUserError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
        self.lambdas = _positive_lambdas(self.lambdas, "--lambdas")
        if self.entropy_lambdas is not None:
            self.entropy_lambdas = _positive_lambdas(self.entropy_lambdas, "--entropy_lambdas")
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
        if self.n_bootstrap < 0:
            raise MRPUserError(f"n_bootstrap must be >= 0 (0: no confidence intervals), got {self.n_bootstrap}")
        if not 0 < self.confidence < 1:
            raise MRPUserError(f"confidence must be between 0 and 1, got {self.confidence}")


def _positive_lambdas(values, flag: str) -> list[float]:
    lambdas = [float(lam) for lam in dict.fromkeys(float(lam) for lam in values)]
    bad = [lam for lam in lambdas if not (np.isfinite(lam) and lam >= 0)]
    if bad:
        raise MRPUserError(f"{flag} must be finite and >= 0, got {bad}")
    if 0.0 in lambdas:
        logger.warning("lambda 0 is the control every seed gets; dropping it from %s", flag)
    return sorted(lam for lam in lambdas if lam > 0)



def build_parser() -> argparse.ArgumentParser:
    defaults = SweepArguments()
    parser = MRPArgumentParser(
        prog="hf-mrp sweep", allow_abbrev=False,
        description="Dose-response sweep: objectives x lambdas x seeds, each seed with a lambda = 0 control "
                    "(cross-entropy only), one shared baseline audit, resumable.",
        epilog="Every other flag (model, data, --audit_positions, --holdout, MRPConfig / TrainingArguments such "
               "as --max_steps, --lora_layers, --learning_rate, --block_size) passes through to every run, with "
               "the defaults of examples/refine.py; `hf-mrp refine --help` lists them.",
    )
    parser.add_argument("--output_dir", default=defaults.output_dir, help="the sweep folder (default %(default)s)")
    parser.add_argument("--objectives", nargs="+", default=defaults.objectives, metavar="OBJ",
                        help="objectives: margin, fisher, entropy (default: %(default)s)")
    parser.add_argument("--lambdas", nargs="+", type=float, default=defaults.lambdas, metavar="L",
                        help="objective weights > 0; the lambda = 0 control is always added (default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, default=defaults.seeds, metavar="S",
                        help="training seeds (default: %(default)s)")
    parser.add_argument("--n_bootstrap", type=int, default=defaults.n_bootstrap,
                        help="bootstrap resamples of the positions for the confidence intervals; 0: none "
                             "(default %(default)s)")
    parser.add_argument("--confidence", type=float, default=defaults.confidence,
                        help="confidence level of the intervals (default %(default)s)")
    parser.add_argument("--bootstrap_seed", type=int, default=defaults.bootstrap_seed,
                        help="rng seed of the bootstrap (default %(default)s)")
    parser.add_argument("--control_objective", default=defaults.control_objective,
                        help="objective name the control carries at weight 0 (MRPConfig needs one; the loss is "
                             "plain cross-entropy either way) (default %(default)s)")
    parser.add_argument("--aggregate_only", action="store_true",
                        help="train nothing: recompute the results from the runs already finished")
    parser.add_argument("--entropy_lambdas", nargs="+", type=float, default=None, metavar="L",
                        help="entropy's own lambda grid (default: --lambdas); the report matches each fisher lambda "
                             "with the entropy lambda of the closest median margin change")
    parser.add_argument("--head_lambdas", nargs="+", type=float, default=[], metavar="L",
                        help="rows with the head W trainable too (--train_lm_head: LoRA + lm_head) at these lambdas, "
                             "each seed with its own CE-only control of the same scope (default: none)")
    parser.add_argument("--head_objective", default=defaults.head_objective,
                        help="objective of the W-trainable rows (default %(default)s)")
    parser.add_argument("--target_lambdas", nargs="+", type=float, default=[], metavar="L",
                        help="targeted rows: the objective weighted to the targets of --target_classes / "
                             "--target_buckets, at these lambdas (default: none)")
    parser.add_argument("--target_objective", default=defaults.target_objective,
                        help="objective of the targeted rows (default %(default)s)")
    parser.add_argument("--target_classes", nargs="*", default=defaults.target_classes, metavar="CLASS",
                        help=f"token classes the targeted rows aim at ({', '.join(CLASSES)}; default %(default)s)")
    parser.add_argument("--target_buckets", nargs="*", default=defaults.target_buckets, metavar="BUCKET",
                        help=f"frequency buckets the targeted rows aim at ({', '.join(BUCKETS)}; default: any)")
    parser.add_argument("--audit_blocks", type=int, default=defaults.audit_blocks,
                        help="blocks audited before/after every run, unless --audit_positions is passed "
                             "(default %(default)s: about 16K positions at --block_size 256)")
    return parser


def parse_sweep_arguments(argv: Sequence[str]) -> tuple[SweepArguments, list[str]]:
    """(the sweep's own arguments, the flags passed through to every run)."""
    namespace, rest = build_parser().parse_known_args(list(argv))
    for token in rest:
        flag = token.split("=", 1)[0]
        if flag in RESERVED_FLAGS:
            raise MRPUserError(f"{flag} is set by the sweep for each run; use {RESERVED_FLAGS[flag]}")
    return SweepArguments(**vars(namespace)), rest



__all__ = ["SweepArguments", "build_parser", "parse_sweep_arguments"]
