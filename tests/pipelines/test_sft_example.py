"""Smoke test of examples/sft_mrp.py on a tiny model: SFT + MRP, held-out assistant-turn audit, flip audit."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sft_mrp.py"


def load_example():
    spec = importlib.util.spec_from_file_location("sft_mrp_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_example_trains_and_audits_heldout_assistant_turns(tiny_model_dir, tmp_path, capsys):
    example = load_example()
    argv = [
        "--model",
        str(tiny_model_dir),
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        "2",
        "--lora_layers",
        "1-2",
        "--max_topics",
        "12",
        "--max_answer_chars",
        "200",
        "--holdout_every",
        "4",
        "--use_cpu",
        "true",
    ]
    assert example.main(argv) == 0
    summary = json.loads((tmp_path / "sft_summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_chats"] == 9 and summary["heldout_chats"] == 3
    comparison = json.loads((tmp_path / "comparison" / "flip_audit.json").read_text())
    assert comparison["n_positions"] == summary["heldout_positions"] > 0
    assert summary["net"] == summary["w2r"] - summary["r2w"] == comparison["net"]
    assert (tmp_path / "adapter_config.json").is_file()
    # the audited positions are exactly the held-out assistant tokens' predictions (template and prompt excluded)
    mask = np.load(tmp_path / "audit_before" / "mask.npy")
    ids = np.load(tmp_path / "audit_before" / "blocks.npy")
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tiny_model_dir)
    answers = [chat[1]["content"] for index, (_, chat) in enumerate(example.topic_chats(200, 12)) if index % 4 == 0]
    for row, row_mask, answer in zip(ids, mask, answers):
        assert tokenizer.decode(row[1:][row_mask]) == answer + "<|im_end|>"
    assert "W->R" in capsys.readouterr().out


def test_example_refuses_bad_holdout_in_one_line(tmp_path, capsys):
    assert load_example().main(["--holdout_every", "1", "--output_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
