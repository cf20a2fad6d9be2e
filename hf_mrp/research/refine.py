"""The refinement pipeline: audit before, MRPTrainer, audit after on identical positions, compare,
model card, optional Hub push. `examples/refine.py` and `hf-mrp refine` run it.

Output folder: the adapter (loadable with `PeftModel.from_pretrained(base, output_dir)`),
README.md (model card), configs (`mrp_config.json`, `run_arguments.json`), `audit_before/`,
`audit_after/` (as `hf-mrp audit` writes them) and `comparison/` (as `hf-mrp compare` writes it),
`runs/` (TensorBoard). With `--eval_strategy steps`, each evaluation (eval loss on the held-out audit
blocks) also audits them into `audit_step_N/` + `comparison_step_N/`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..audit.summary import AuditSummary
from ..data import Blocks, check_block_fits
from ..data.sources import check_data_flags_apply
from ..errors import MRPUserError
from ..ops.targeting import check_targets, objective_weights
from ..storage import files
from ..storage.locks import is_main_process, owned_folder
from ..training import MRPConfig, MRPTrainer
from ..training.callbacks import MRPAuditCallback
from ..training.dataset_checks import WEIGHTS_COLUMN
from ..training.divergence import TrainingDiverged
from .arguments import DataArguments, ModelArguments, provenance
from .loading import load_blocks_from_arguments, load_model_from_arguments
from .run_folders import TRAINING_LOG, check_may_write, forget_finished_run

logger = logging.getLogger(__name__)

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
        try:
            check_targets(self.mrp_target_classes, self.mrp_target_buckets)
        except ValueError as error:
            raise MRPUserError(f"{error} (--mrp_target_classes / --mrp_target_buckets)") from None
        if not 0.0 <= self.mrp_untargeted_weight <= 1.0:
            raise MRPUserError(f"mrp_untargeted_weight must be in [0, 1], got {self.mrp_untargeted_weight}")

    @property
    def targeted(self) -> bool:
        return bool(self.mrp_target_classes or self.mrp_target_buckets)


def split_blocks(blocks: Blocks, audit_positions: int, holdout: bool) -> tuple[Blocks, np.ndarray]:
    """(audit blocks, training blocks): the audit takes the first blocks; training the rest (or all)."""
    per_block = blocks.block_size - 1
    n_audit = -(-audit_positions // per_block)
    if n_audit >= len(blocks.input_ids) and holdout:
        raise MRPUserError(
            f"the data has {len(blocks.input_ids)} blocks, not enough for {n_audit} audit blocks plus training; "
            "pass more text, a larger --max_positions, fewer --audit_positions, or --holdout false"
        )
    audit = Blocks(
        blocks.input_ids[:n_audit], min(audit_positions, n_audit * per_block), blocks.source, blocks.tokenizer
    )
    train = blocks.input_ids[n_audit:] if holdout else blocks.input_ids
    return audit, train


def refine_blocks(tokenizer, data_args: DataArguments, refine_args: RefineArguments) -> tuple[Blocks, np.ndarray]:
    """(audit blocks, training blocks) from the data arguments: what every refine run and sweep uses."""
    blocks = load_blocks_from_arguments(tokenizer, data_args, extra_positions=refine_args.audit_positions)
    return split_blocks(blocks, refine_args.audit_positions, refine_args.holdout)


def training_dataset(train_ids: np.ndarray, weights: np.ndarray | None = None):
    """input_ids and labels, plus MRPTrainer's per-token ``mrp_weights`` column when targeting."""
    from datasets import Dataset

    columns = {"input_ids": train_ids.tolist(), "labels": train_ids.tolist()}
    if weights is not None:
        columns[WEIGHTS_COLUMN] = weights.tolist()
    return Dataset.from_dict(columns)


def target_weights(train_ids: np.ndarray, tokenizer, refine_args: RefineArguments) -> np.ndarray | None:
    """Per-token objective weights of the training blocks (None: no targeting)."""
    if not refine_args.targeted:
        return None
    from ..audit.compare import decoder_from_tokenizer

    weights = objective_weights(
        train_ids,
        decoder_from_tokenizer(tokenizer),
        refine_args.mrp_target_classes,
        refine_args.mrp_target_buckets,
        refine_args.mrp_untargeted_weight,
    )
    targeted = float(np.mean(weights == 1.0))
    logger.info("targeting: %.1f%% of the training tokens are targeted", 100 * targeted)
    if targeted == 0.0:
        raise MRPUserError(
            "no training token is of the targeted classes/buckets; widen --mrp_target_classes / --mrp_target_buckets"
        )
    return weights


def head_peft_config(model, config: MRPConfig):
    """The LoRA config of ``config`` with the output head added to modules_to_save (W trains too)."""
    from ..training.adapters import lora_config_from_args

    if not config.use_lora:
        raise MRPUserError(
            "--train_lm_head adds W to a LoRA adapter; without LoRA (--use_lora false) the whole "
            "model, W included, trains already: drop --train_lm_head"
        )
    head = model.get_output_embeddings()
    name = next(name for name, module in model.named_modules() if module is head)
    peft_config = lora_config_from_args(config, model)
    peft_config.modules_to_save = [name.rsplit(".", 1)[-1]]
    return peft_config


def refine(
    model_args: ModelArguments,
    data_args: DataArguments,
    refine_args: RefineArguments,
    config: MRPConfig,
    baseline_dir: str | Path | None = None,
) -> dict:
    """Run the whole pipeline; returns the comparison (flip audit) dictionary.

    The output folder is owned for the run (ownership.owned_folder): a second run into it stops at once.
    A folder holding a finished run is only written again with ``overwrite_output_dir`` or a resume.
    ``baseline_dir``: an existing audit of the same blocks to reuse as the "before" audit (a sweep
    shares one across its runs).
    """
    output_dir = files.ensure_output_dir(config.output_dir)
    main = config.should_save and is_main_process()  # one process of a distributed run owns the folder
    with owned_folder(output_dir, active=main):
        check_may_write(output_dir, refine_args.overwrite_output_dir, config.resume_from_checkpoint)
        if main and refine_args.overwrite_output_dir and not config.resume_from_checkpoint:
            forget_finished_run(output_dir)
        return _refine_into(output_dir, model_args, data_args, refine_args, config, baseline_dir)


def _refine_into(output_dir: Path, model_args, data_args, refine_args, config: MRPConfig, baseline_dir) -> dict:
    push, config.push_to_hub = config.push_to_hub, False  # push ourselves, after everything is saved
    check_data_flags_apply(data_args)
    model, tokenizer, model_name = load_model_from_arguments(model_args)
    check_block_fits(model, data_args.block_size)
    audit_blocks, train_ids = refine_blocks(tokenizer, data_args, refine_args)
    origin = provenance(model_name, model_args, data_args, refine_args)
    audit = MRPAuditCallback(
        audit_blocks,
        tokenizer=tokenizer,
        batch_size=refine_args.audit_batch_size,
        chunk_size=config.mrp_chunk_size,
        baseline_dir=baseline_dir,
        provenance=origin,
    )
    repo_id = config.hub_model_id or output_dir.name
    hub = hub_callback(config, repo_id) if push else None
    evaluating = str(getattr(config.eval_strategy, "value", config.eval_strategy)) != "no"
    peft_config = head_peft_config(model, config) if refine_args.train_lm_head else None
    trainer = MRPTrainer(
        model=model,
        args=config,
        peft_config=peft_config,
        train_dataset=training_dataset(train_ids, target_weights(train_ids, tokenizer, refine_args)),
        eval_dataset=training_dataset(audit_blocks.input_ids) if evaluating else None,
        processing_class=tokenizer,
        callbacks=[audit, *filter(None, [hub])],
    )
    train_to_finite_weights(trainer, output_dir, config.resume_from_checkpoint)
    save_adapter(trainer, tokenizer, output_dir)
    if trainer.is_world_process_zero():
        write_run_files(
            output_dir, model_name, config, origin, audit.baseline.summary, audit.latest.summary, audit.comparison
        )
        files.write_json(output_dir / TRAINING_LOG, trainer.state.log_history)  # last: marks a finished run
        if push:
            from ..training.hub import push_folder

            hub.wait()  # the pushes made during training land first; the final push replaces their card
            push_folder(output_dir, repo_id, config.hub_token, config.hub_private_repo)
    return audit.comparison


def train_to_finite_weights(trainer, output_dir: Path, resume_from_checkpoint) -> None:
    """Train; a run that diverges (MRPTrainer checks the weights at every step and after the last one) fails, and
    the after-audit and comparison the audit callback made of non-finite weights at train end are removed."""
    import shutil

    try:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except TrainingDiverged:
        if trainer.is_world_process_zero():
            for name in ("audit_after", "comparison"):
                shutil.rmtree(output_dir / name, ignore_errors=True)
        raise


def hub_callback(config: MRPConfig, repo_id: str):
    """Pushes during training at each save, by ``config.hub_strategy`` (hub.HubPushCallback)."""
    from ..training.hub import HubPushCallback
    from .reports.model_card import card_from_folder

    settings = config.to_dict()  # token-free
    return HubPushCallback(
        repo_id,
        config.output_dir,
        config.hub_token,
        config.hub_private_repo,
        config.hub_strategy,
        config.hub_revision,
        config.hub_always_push,
        card=lambda folder, step: card_from_folder(folder, settings, step),
    )


def save_size(model, tokenizer) -> int:
    """Bytes the adapter (or the whole model, without LoRA) and the tokenizer take on disk, about."""
    try:
        from peft import PeftModel, get_peft_model_state_dict

        tensors = get_peft_model_state_dict(model) if isinstance(model, PeftModel) else model.state_dict()
    except Exception:  # an estimate only: never fail a save over it
        tensors = {}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return size + (len(backend.to_str().encode()) if backend is not None else 0) + 64_000  # + configs, card


def save_adapter(trainer, tokenizer, output_dir: Path) -> None:
    """The adapter and tokenizer, saved atomically: into a staging folder, then moved file by file.

    A full disk or a crash while saving leaves the previous files (or none), never a partial one.
    training_args.bin (a pickle) is dropped: mrp_config.json holds the settings as JSON."""
    needed = save_size(trainer.accelerator.unwrap_model(trainer.model), tokenizer)
    with files.staged_folder(output_dir, "saving the adapter and tokenizer", needed) as staging:
        trainer.save_model(str(staging))
        (staging / "training_args.bin").unlink(missing_ok=True)


def write_run_files(
    output_dir: Path,
    model_name: str,
    config: MRPConfig,
    origin: dict,
    before: AuditSummary,
    after: AuditSummary,
    comparison: dict,
) -> None:
    """Configs (token-free: TrainingArguments.to_dict redacts *_token fields) and the model card."""
    from ..reporting.markdown import markdown_summary
    from .reports.model_card import evaluation_comparisons, model_card

    settings = config.to_dict()
    files.write_json(output_dir / "mrp_config.json", settings)
    files.write_json(output_dir / "run_arguments.json", origin)
    images = [p.relative_to(output_dir).as_posix() for p in sorted((output_dir / "comparison").glob("*.png"))]
    card = model_card(
        model_name,
        settings,
        before,
        after,
        markdown_summary(comparison, heading="###"),
        images,
        data_arguments=origin.get("arguments", {}),
        evaluations=evaluation_comparisons(output_dir),
    )
    files.write_text(output_dir / "README.md", card)


__all__ = ["RefineArguments", "refine", "split_blocks", "DEFAULTS"]
