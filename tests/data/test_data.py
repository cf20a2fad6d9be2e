"""Text sources -> deterministic blocks."""

import json

import numpy as np

from hf_mrp.data import Blocks, load_blocks, make_blocks


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
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"text number {i}"}) for i in range(20)))
    assert load_blocks(char_tokenizer, str(tmp_path / "a.txt"), block_size=16, max_positions=30).n_positions == 30
    blocks = load_blocks(char_tokenizer, str(tmp_path / "a.jsonl"), text_column="body", block_size=16, max_positions=30)
    assert char_tokenizer.decode(blocks.input_ids[0]) == "text number 0\n\nt"


def test_fingerprint_tells_positions_apart():
    ids = np.arange(12).reshape(2, 6)
    assert Blocks(ids, 10, "").fingerprint() != Blocks(ids, 9, "").fingerprint()


MEASURE_AUDIT = """
import json, sys
import hf_mrp.research.audit_run, hf_mrp.research.cli, transformers  # the libraries' own memory is not the data's


def status(key):
    line = next(line for line in open("/proc/self/status") if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


before = status("VmRSS")
code = hf_mrp.research.cli.main(sys.argv[1:])
print(json.dumps({"code": code, "extra_bytes": status("VmHWM") - before}))
"""


def test_audit_of_200_positions_from_a_40mb_text_file_reads_only_what_it_needs(tiny_model_dir, tmp_path):
    """Issue 15: the text file is read and tokenized piece by piece until 200 positions are covered."""
    import json
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    rng = np.random.default_rng(0)
    words = np.array(["margin", "token", "decision", "boundary", "cell", "logit", "the", "of", "a", "model"])
    line = " ".join(rng.choice(words, size=120)) + "\n"
    big = tmp_path / "big.txt"
    with open(big, "w", encoding="utf-8") as handle:
        for _ in range(40 * 2**20 // len(line)):
            handle.write(line)
    assert big.stat().st_size > 40e6
    root = Path(__file__).resolve().parents[2]
    start = time.perf_counter()
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            MEASURE_AUDIT,
            "audit",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(big),
            "--block_size",
            "64",
            "--max_positions",
            "200",
            "--output_dir",
            str(tmp_path / "audit"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    seconds = time.perf_counter() - start
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, run.stderr[-2000:]
    assert result["extra_bytes"] < 1e9, result  # measured: tens of MB (one 1 MiB piece is tokenized)
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["n_positions"] == 200 and seconds < 120
    # the blocks are the file's first tokens: the same as tokenizing its first piece alone
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with open(big, encoding="utf-8") as handle:
        head = handle.read(20_000)
    head = head[: head.rfind("\n") + 1]
    expected = tokenizer(head, add_special_tokens=False)["input_ids"][: 4 * 64]
    blocks = np.load(tmp_path / "audit" / "blocks.npy")
    assert blocks.reshape(-1).tolist() == expected


class CountingTokenizer:
    """Characters as ids (like helpers.CharTokenizer), recording every text it is asked to tokenize."""

    def __init__(self):
        self.texts = []

    def __call__(self, text, add_special_tokens=False):
        self.texts.append(text)
        return {"input_ids": [ord(c) % 97 for c in text]}


def test_text_files_and_tables_are_read_only_until_max_positions(tmp_path):
    from hf_mrp.data import PIECE_BYTES

    line = "a line of text that repeats\n"
    big = tmp_path / "big.txt"
    big.write_text(line * (3 * PIECE_BYTES // len(line)))
    tokenizer = CountingTokenizer()
    blocks = load_blocks(tokenizer, str(big), block_size=16, max_positions=30)
    assert blocks.n_positions == 30
    pieces = tokenizer.texts[1:]  # the first call tokenizes the document separator
    assert len(pieces) == 1 and len(pieces[0]) <= PIECE_BYTES and pieces[0].endswith("\n")
    np.testing.assert_array_equal(blocks.input_ids.reshape(-1), [ord(c) % 97 for c in (line * 2)[:32]])

    table = tmp_path / "rows.jsonl"
    table.write_text("\n".join(json.dumps({"text": f"row {i} " * 5}) for i in range(5000)))
    tokenizer = CountingTokenizer()
    load_blocks(tokenizer, str(table), block_size=16, max_positions=30)
    assert len(tokenizer.texts) <= 3  # the separator and the first rows, not 5,000 rows


def test_encoding_flags_decode_or_repair_a_text_file(tmp_path, char_tokenizer):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café crème ".encode("latin-1") * 10)
    tokenizer = CountingTokenizer()
    load_blocks(tokenizer, str(latin), block_size=8, max_positions=7, encoding="latin-1")
    assert tokenizer.texts[1].startswith("café crème")
    tokenizer = CountingTokenizer()
    load_blocks(tokenizer, str(latin), block_size=8, max_positions=7, encoding_errors="replace")
    assert tokenizer.texts[1].startswith("caf\ufffd cr\ufffdme")


def test_a_file_cut_into_pieces_gives_the_same_blocks_for_every_max_positions(tmp_path, monkeypatch):
    import hf_mrp.data

    monkeypatch.setattr(hf_mrp.data.sources, "PIECE_BYTES", 64)  # many pieces, some lines longer than a piece
    text = "".join(f"line {i} " * (1 + i % 13) + "\n" for i in range(200))
    path = tmp_path / "t.txt"
    path.write_text(text)
    tokenizer = CountingTokenizer()
    whole = load_blocks(tokenizer, str(path), block_size=16, max_positions=10**6)
    assert "".join(tokenizer.texts[1:]) == text  # the pieces are the file, in order, nothing lost or repeated
    short = load_blocks(CountingTokenizer(), str(path), block_size=16, max_positions=45)
    np.testing.assert_array_equal(short.input_ids, whole.input_ids[: len(short.input_ids)])
