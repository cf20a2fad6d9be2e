"""Text sources -> deterministic blocks."""

import json

import numpy as np
import pytest

from hf_mrp.data import Blocks, load_blocks, make_blocks
from hf_mrp.errors import MRPUserError


def test_blocks_are_consecutive_and_cover_max_positions(char_tokenizer):
    text = "abcdefghijklmnopqrstuvwxyz" * 10
    blocks = make_blocks(char_tokenizer, [text], block_size=8, max_positions=20)
    assert blocks.input_ids.shape == (3, 8)  # ceil(20 / 7) blocks
    assert blocks.n_positions == 20
    np.testing.assert_array_equal(blocks.input_ids.reshape(-1), [ord(c) for c in text[:24]])
    mask = blocks.position_mask()
    assert mask.sum() == 20 and mask[:2].all() and mask[2].sum() == 6
    labels = blocks.labels()
    assert (labels[2, 1:] == -100).sum() == 1 and (labels[:, 0] == blocks.input_ids[:, 0]).all()


def test_same_arguments_same_blocks_and_documents_are_joined(char_tokenizer):
    a = make_blocks(char_tokenizer, ["one", "two"], block_size=4, max_positions=3)
    b = make_blocks(char_tokenizer, ["one", "two"], block_size=4, max_positions=3)
    assert a.fingerprint() == b.fingerprint()
    assert char_tokenizer.decode(a.input_ids[0]) == "one\n"


def test_embedded_corpus_is_pydoc(char_tokenizer):
    blocks = load_blocks(char_tokenizer, block_size=64, max_positions=630)
    assert blocks.source == "pydoc_data.topics" and blocks.input_ids.shape == (10, 64)


def test_local_files(tmp_path, char_tokenizer):
    (tmp_path / "a.txt").write_text("hello world " * 20)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": "text number %d" % i}) for i in range(20)))
    assert load_blocks(char_tokenizer, str(tmp_path / "a.txt"), block_size=16, max_positions=30).n_positions == 30
    blocks = load_blocks(char_tokenizer, str(tmp_path / "a.jsonl"), text_column="body", block_size=16, max_positions=30)
    assert char_tokenizer.decode(blocks.input_ids[0]) == "text number 0\n\nt"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_size": 1}, "block_size must be at least 2"),
        ({"max_positions": 0}, "max_positions must be positive"),
        ({"dataset": "missing.jsonl"}, "data file not found"),
        ({"dataset": "EMPTY"}, "fewer than one block"),
        ({"dataset": "JSONL", "text_column": "nope"}, "text column 'nope' not found"),
    ],
)
def test_bad_data_arguments(tmp_path, char_tokenizer, kwargs, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    names = {"EMPTY": str(tmp_path / "empty.txt"), "JSONL": str(tmp_path / "d.jsonl")}
    if "dataset" in kwargs:
        kwargs["dataset"] = names.get(kwargs["dataset"], str(tmp_path / kwargs["dataset"]))
    with pytest.raises(MRPUserError, match=message):
        load_blocks(char_tokenizer, **kwargs)


def test_fingerprint_tells_positions_apart():
    ids = np.arange(12).reshape(2, 6)
    assert Blocks(ids, 10, "").fingerprint() != Blocks(ids, 9, "").fingerprint()
