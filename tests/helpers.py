"""Shared test helpers (import them: ``from helpers import ...``); fixtures stay in conftest.py."""

from __future__ import annotations

from conftest import VOCAB


def tiny_tokenizer(vocab: int = VOCAB):
    """A real `PreTrainedTokenizerFast` over ``vocab`` word-level tokens (pad 0, bos 1, eos 2): what collators and
    TRL need from a tokenizer, built offline in milliseconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>"] + [f"t{i}" for i in range(3, vocab)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
