"""Shared fixtures: tiny random Llama models (seconds) and a character-level tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network (before any HF import)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from hf_mrp.data import Blocks

VOCAB = 97


class CharTokenizer:
    """A deterministic stand-in tokenizer: one id per character (enough for the data pipeline)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) if ord(c) < 128 else 63 for c in text]}

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)


def tiny_llama(seed: int = 0, tie: bool = False, layers: int = 3, vocab: int = VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a larger logit scale than the default init, so margins spread out
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture
def blocks() -> Blocks:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(5, 24), dtype=np.int64)
    return Blocks(ids, n_positions=5 * 23 - 7, source="random")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama folder saved with the embedded SmolLM2 tokenizer (CLI and pipeline tests)."""
    from transformers import AutoTokenizer

    from hf_mrp import models

    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama(vocab=49152).save_pretrained(folder)
    AutoTokenizer.from_pretrained(models.embedded_model_dir()).save_pretrained(folder)
    return folder


def assert_refuses_bad_checkpoints(trainer, output_dir) -> None:
    """A trainer refuses, with the fix, a missing checkpoint folder, a half-written one, and `True` with none."""
    import pytest

    from hf_mrp.errors import MRPUserError

    with pytest.raises(MRPUserError, match="is not a folder"):
        trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-9"))
    (output_dir / "checkpoint-4").mkdir()
    (output_dir / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hi')  # cut short
    with pytest.raises(MRPUserError, match="checkpoint .*checkpoint-4 is incomplete.*no complete checkpoint"):
        trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-4"))
    with pytest.raises(MRPUserError, match="holds no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)
