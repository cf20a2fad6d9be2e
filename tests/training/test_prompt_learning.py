"""Prompt learning (PEFT prompt tuning, p-tuning): at lambda 0 the MRP loss is the reference trainer's, in loss
and gradients, on rows whose first label is real.

PEFT prepends k virtual tokens and pads the labels with k ignored entries *before* the model shifts them, so the
last virtual position predicts each row's first label. A loss that pads after the shift drops that label (and the
gradient that reaches the prompt most directly); rows that start with a masked label cannot see the difference,
so every row here starts with a real one. References: `transformers.Trainer` (PEFT's own forward and the model's
loss) and TRL's `SFTTrainer` (its fused head under PEFT's forward). Fast tier: a tiny Llama and a word-level
tokenizer, one forward and backward per trainer.
"""

from __future__ import annotations

import copy

import numpy as np
import peft
import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hf_mrp.training import MRPConfig, MRPTrainer

from helpers import (
    F32_U,
    SMALL,
    VOCAB,
    cpu_arguments,
    head_input_bound,
    mean_ce_rounding_bound,
    tiny_llama,
    tiny_tokenizer,
)

VIRTUAL = 4
ENCODER = 16  # the p-tuning encoder's hidden size
ROWS, LENGTH = 4, 12


def adapter(kind: str):
    """The tiny Llama under a prompt-learning adapter, initialised from a fixed seed."""
    torch.manual_seed(0)
    config = (
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL)
        if kind == "prompt_tuning"
        else peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL, encoder_hidden_size=ENCODER)
    )
    return peft.get_peft_model(tiny_llama(), config).train()  # no dropout in either: train mode is deterministic


def rows() -> dict[str, torch.Tensor]:
    """Every row's first label is real (the one an off-by-one in the virtual-token alignment drops); one row has a
    masked span in the middle, so ignored labels are still exercised."""
    ids = torch.as_tensor(np.random.default_rng(0).integers(3, VOCAB, size=(ROWS, LENGTH)))
    labels = ids.clone()
    labels[1, 5:7] = -100
    assert bool(labels[:, 0].ne(-100).all())
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def trainer_pair(model, tmp_path, family: str):
    """(reference, MRP) trainers at lambda 0, each on its own copy of the same adapted model."""
    if family == "trainer":
        plain = Trainer(model=copy.deepcopy(model), args=TrainingArguments(**cpu_arguments(tmp_path / "plain")))
        args = MRPConfig(**cpu_arguments(tmp_path / "mrp"), mrp_lambda=0.0, use_lora=False)
        return plain, MRPTrainer(model=copy.deepcopy(model), args=args)
    pytest.importorskip("trl")
    from trl import SFTConfig, SFTTrainer

    from hf_mrp.training.sft import MRPSFTConfig, MRPSFTTrainer

    common = dict(report_to=[], use_cpu=True, bf16=False, save_strategy="no", seed=0)
    data = Dataset.from_dict({"input_ids": rows()["input_ids"].tolist()})  # SFTTrainer requires a dataset
    shared = dict(processing_class=tiny_tokenizer(), train_dataset=data)
    sft = SFTTrainer(model=copy.deepcopy(model), args=SFTConfig(output_dir=str(tmp_path / "sft"), **common), **shared)
    args = MRPSFTConfig(output_dir=str(tmp_path / "mrp"), mrp_lambda=0.0, **common)
    return sft, MRPSFTTrainer(model=copy.deepcopy(model), args=args, **shared)


def loss_and_gradients(trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """One compute_loss (no num_items_in_batch: the mean over the positions the trainer itself counts), its
    backward, and the trainable gradients."""
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, rows())
    loss.backward()
    return float(loss.detach()), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def gradient_bound_factor(kind: str) -> float:
    """Normwise relative bound on ||g_a - g_b|| / ||g_b|| for the trainable gradients, first order in u.

    The body's backward is the same linear map on both sides; the gradients differ by its rounding and by the
    head's. Each step of the chain is a float32 reduction, rounding by at most (its length) x u relative to the
    sum of the absolute values of its terms (Higham, Accuracy and Stability of Numerical Algorithms, 3.1); summing
    the reduction lengths along the chain (head: V + d; per layer: q, k, v and o projections 4d, attention over T
    positions, MLP up/gate d and down ffn; p-tuning's encoder: its hidden size twice) and doubling for two sides
    gives the factor. It assumes the absolute-value sums are within a small factor of the gradient's norm (no
    catastrophic cancellation: a random-init model's gradients are not near zero in norm)."""
    d, ffn, layers = SMALL["hidden_size"], SMALL["intermediate_size"], tiny_llama().config.num_hidden_layers
    positions = VIRTUAL + LENGTH
    chain = VOCAB + d + layers * (4 * d + positions + d + ffn) + (2 * ENCODER if kind == "p_tuning" else 0)
    return 2 * chain * F32_U


@pytest.mark.parametrize("family", ["trainer", "sft"])
@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning"])
def test_prompt_learning_loss_and_gradients_equal_the_reference_trainer(tmp_path, kind, family):
    reference, mrp = trainer_pair(adapter(kind), tmp_path, family)
    want, want_grads = loss_and_gradients(reference)
    got, got_grads = loss_and_gradients(mrp)
    positions = int(rows()["labels"].ne(-100).sum())  # PEFT's shift: every real label, the first ones included
    assert mrp.recorded_sums()["n"] == positions
    bound = mean_ce_rounding_bound(VOCAB, SMALL["hidden_size"], head_input_bound(mrp.model), positions, want)
    assert abs(got - want) <= bound, (got, want, bound)
    assert want_grads.keys() == got_grads.keys() and want_grads
    factor = gradient_bound_factor(kind)
    for name, grad in want_grads.items():
        assert float(grad.norm()) > 0, name  # every trainable tensor gets a gradient to compare
        assert float((got_grads[name] - grad).norm()) <= factor * float(grad.norm()), name


def test_labels_longer_than_the_inputs_are_refused_in_one_line(tmp_path):
    """The alignment refuses what no padding explains (more labels than positions), naming both lengths."""
    from hf_mrp.errors import MRPUserError

    trainer = MRPTrainer(model=tiny_llama(), args=MRPConfig(**cpu_arguments(tmp_path), mrp_lambda=0.0, use_lora=False))
    inputs = rows()
    inputs["labels"] = torch.cat([inputs["labels"], inputs["labels"][:, :2]], dim=1)
    with pytest.raises(MRPUserError, match=f"returned {LENGTH} positions for labels of {LENGTH + 2}"):
        trainer.compute_loss(trainer.model, inputs)
