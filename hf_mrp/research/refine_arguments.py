"""The settings of `hf-mrp refine` beyond the model, data and MRPConfig: which positions are audited, targeting,
a trainable head (RefineArguments), and the defaults of `examples/refine.py` (DEFAULTS)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import MRPUserError
from ..ops.targeting import WEIGHTINGS, check_targets
from ..training.divergence import DEFAULT_MAX_ACCURACY_DROP, check_max_accuracy_drop
from .arguments import audit_options, manifold_field
from .downstream.offline_suite import SUITES

# What `examples/refine.py` does with no arguments: Fisher, lambda 0.6, LoRA r=16 on layers 20-29 of
# the embedded SmolLM2, 60 steps of 4 x 256 tokens, audited on 4,080 held-out positions (< 10 min, 2 cores).
DEFAULTS = dict(
    output_dir="outputs/refine",
    block_size=256,
    max_positions=61200,
    mrp_objective="fisher",
    mrp_lambda=0.6,
    lora_layers="20-29",
    lora_r=16,
    lora_alpha=32,
    learning_rate=2e-4,
    max_steps=60,
    per_device_train_batch_size=4,
    logging_steps=10,
    save_strategy="no",
    report_to="tensorboard",
    seed=0,
    lr_scheduler_type="constant",
)


@dataclass
class RefineArguments:
    """Which positions are audited before and after refinement."""

    audit_positions: int = field(default=4080, metadata={"help": "Positions audited before and after (fixed blocks)."})
    audit_batch_size: int = field(default=8, metadata={"help": "Blocks per forward pass in the audits."})
    audit_layers: str | None = field(
        default=None,
        metadata={
            "help": "Also audit these layers through the logit lens before and after (e.g. '20-29', '3,5,7', "
            "'all'): layers.json and the lens pictures in audit_before/ and audit_after/, per-layer curves in "
            "the trackers, the pictures in the model card. Default: the final layer only."
        },
    )
    manifold: bool = manifold_field("manifold", False)
    manifold_positions: int = manifold_field("manifold_positions", 4096)
    manifold_k: int = manifold_field("manifold_k", 20)
    manifold_seed: int = manifold_field("manifold_seed", 0)
    max_accuracy_drop: float = field(
        default=DEFAULT_MAX_ACCURACY_DROP,
        metadata={
            "help": "Fail the run as collapsed when the audited positions' top-1 accuracy after training is more "
            "than this many points (of 100) below the accuracy before: the objective outweighed the cross-entropy "
            "(e.g. mrp_ce_weight 0). 100: never (to keep such a run for study)."
        },
    )
    holdout: bool = field(
        default=True,
        metadata={"help": "Audit blocks are held out from training (disjoint); --holdout false trains on them too."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace a finished run in --output_dir (its adapter, audits and card). Without it "
            "a folder holding a finished run is refused (a resume with --resume_from_checkpoint "
            "is allowed)."
        },
    )
    mrp_target_classes: list[str] | None = field(
        default=None,
        metadata={
            "help": "Aim the objective at targets of these token classes (structural numeric function entity "
            "content other); other positions get --mrp_untargeted_weight. Default: all positions."
        },
    )
    mrp_target_buckets: list[str] | None = field(
        default=None,
        metadata={
            "help": "Aim the objective at targets in these frequency buckets of the training blocks (1 2-4 "
            "5-19 20-99 100+); combined with --mrp_target_classes by AND. Default: all."
        },
    )
    mrp_untargeted_weight: float = field(
        default=0.0,
        metadata={"help": "Objective weight of the positions not targeted, in [0, 1] (CE is never weighted)."},
    )
    mrp_weighting: str = field(
        default="none",
        metadata={
            "help": "Per-token objective weights: 'inverse_frequency' weighs each target by 1 / its count in the "
            "training blocks, scaled to mean 1 (the paper's open direction; multiplied with the targeting "
            "weights); 'none' weighs all alike.",
            "choices": list(WEIGHTINGS),
        },
    )
    objectives_module: str | None = field(
        default=None,
        metadata={
            "help": "A Python file of your own objectives (each one function and one hf_mrp.register_objective "
            "call, docs/objectives.md), imported before the flags are checked: its names are --mrp_objective values."
        },
    )
    paper_curves: bool = field(
        default=False,
        metadata={
            "help": "Draw this run's training curves over the paper's released runs (paper_curves.png) and list "
            "where its settings depart from the released protocol (paper_protocol.json); on with --preset paper."
        },
    )
    downstream: str | None = field(
        default=None,
        metadata={
            "help": "After the after-audit, run this downstream suite on the base model and on base + the new "
            "adapter, item by item, and put the verdict table in the model card ('offline': data that installed "
            'packages ship; needs `pip install "hf_mrp[eval]"`; docs/downstream.md). Default: none.',
            "choices": list(SUITES),
        },
    )
    train_lm_head: bool = field(
        default=False,
        metadata={
            "help": "Also train the output head W (lm_head, through PEFT modules_to_save; a tied head gets "
            "its own trainable copy, the input embeddings stay frozen). Needs use_lora."
        },
    )

    def __post_init__(self) -> None:
        if self.audit_positions <= 0:
            raise MRPUserError(f"audit_positions must be positive, got {self.audit_positions}")
        if self.audit_batch_size < 1:
            raise MRPUserError(
                f"audit_batch_size must be at least 1 (blocks per forward pass of the audits), got "
                f"{self.audit_batch_size}"
            )
        audit_options(self, "audit_")
        check_max_accuracy_drop(self.max_accuracy_drop)
        try:
            check_targets(self.mrp_target_classes, self.mrp_target_buckets)
        except ValueError as error:
            raise MRPUserError(f"{error} (--mrp_target_classes / --mrp_target_buckets)") from None
        if self.mrp_weighting not in WEIGHTINGS:
            raise MRPUserError(f"mrp_weighting must be one of {', '.join(WEIGHTINGS)}, got {self.mrp_weighting!r}")
        if not 0.0 <= self.mrp_untargeted_weight <= 1.0:
            raise MRPUserError(f"mrp_untargeted_weight must be in [0, 1], got {self.mrp_untargeted_weight}")

    @property
    def targeted(self) -> bool:
        return bool(self.mrp_target_classes or self.mrp_target_buckets)

    @property
    def weighted(self) -> bool:
        """Whether the objective gets per-token weights (targeting or a weighting)."""
        return self.targeted or self.mrp_weighting != "none"


__all__ = ["RefineArguments", "DEFAULTS"]
