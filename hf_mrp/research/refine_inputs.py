"""What a refinement trains on and audits: the audit blocks split from the training blocks, the training dataset,
the targeting weights, the LoRA config with a trainable head. refine.py runs the pipeline on them."""

from __future__ import annotations

import logging

import numpy as np

from ..data import Blocks
from ..errors import MRPUserError
from ..ops.targeting import inverse_frequency_weights, objective_weights
from ..training import MRPConfig
from ..training.dataset_checks import WEIGHTS_COLUMN
from .arguments import DataArguments
from .loading import load_blocks_from_arguments
from .refine_arguments import RefineArguments

logger = logging.getLogger(__name__)


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
    """Per-token objective weights of the training blocks (None: all weigh 1): the targeting weights of
    --mrp_target_classes / --mrp_target_buckets times the --mrp_weighting weights."""
    if not refine_args.weighted:
        return None
    weights = _targeting(train_ids, tokenizer, refine_args) if refine_args.targeted else None
    if refine_args.mrp_weighting == "inverse_frequency":
        frequency = inverse_frequency_weights(train_ids)
        weights = frequency if weights is None else weights * frequency
    return weights


def _targeting(train_ids: np.ndarray, tokenizer, refine_args: RefineArguments) -> np.ndarray:
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


__all__ = ["split_blocks", "refine_blocks", "training_dataset", "target_weights", "head_peft_config"]
