"""Trainable scopes beside LoRA (the paper's released `--trainable-scope`): exactly the scope's weights train, every
other weight stays bit for bit, and a scope that cannot apply is one line before any work."""

from __future__ import annotations

import pytest
import torch

from hf_mrp.errors import MRPUserError
from hf_mrp.training import MRPTrainer

from helpers import config, dataset, tiny_llama

# the tiny Llama: 3 decoder blocks (model.layers.0-2), model.norm, model.embed_tokens, lm_head (untied)
EXPECTED = {
    "last_n_blocks": lambda name: name.startswith(("model.layers.1.", "model.layers.2.", "model.norm.")),
    "final_norm": lambda name: name.startswith("model.norm."),
    "embeddings": lambda name: name.startswith("model.embed_tokens."),
    "lm_head": lambda name: name.startswith("lm_head."),
    "full": lambda name: True,
}


@pytest.mark.parametrize("scope", list(EXPECTED))
def test_a_scope_trains_its_weights_and_no_other(tmp_path, scope):
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = config(tmp_path, trainable_scope=scope, trainable_last_n=2, learning_rate=1e-2, max_steps=2)
    assert not args.use_lora  # a scope other than 'lora' trains no adapter
    trainer = MRPTrainer(model=model, args=args, train_dataset=dataset(8))
    trainer.train()
    trained = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained == {name for name in before if EXPECTED[scope](name)} and trained
    for name, parameter in trainer.model.named_parameters():
        changed = not torch.equal(parameter.detach(), before[name])
        assert changed == (name in trained), name  # Adam moves every trained entry by ~lr; frozen ones not at all


def test_use_lora_false_is_the_full_scope_and_keeps_the_callers_frozen_weights(tmp_path):
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    args = config(tmp_path, use_lora=False)
    assert args.trainable_scope == "full"
    trainer = MRPTrainer(model=model, args=args, train_dataset=dataset(4))
    assert not trainer.model.model.embed_tokens.weight.requires_grad and trainer.model.lm_head.weight.requires_grad


def test_scopes_that_cannot_apply_are_refused_in_one_line(tmp_path):
    from peft import LoraConfig

    with pytest.raises(MRPUserError, match="trainable_last_n 4 is out of range: the model has 3 decoder blocks"):
        MRPTrainer(model=tiny_llama(), args=config(tmp_path, trainable_scope="last_n_blocks", trainable_last_n=4))
    with pytest.raises(MRPUserError, match="trainable_scope 'final_norm' trains the model's own weights, but an"):
        MRPTrainer(
            model=tiny_llama(),
            args=config(tmp_path, trainable_scope="final_norm"),
            peft_config=LoraConfig(target_modules=["q_proj"]),
        )
    with pytest.raises(MRPUserError, match="trainable_scope must be one of lora, last_n_blocks"):
        config(tmp_path, trainable_scope="head")
    with pytest.raises(MRPUserError, match="trainable_last_n must be >= 1, got 0"):
        config(tmp_path, trainable_scope="last_n_blocks", trainable_last_n=0)
