"""`hf-mrp refine --preset paper`: the released run files' settings as defaults (explicit flags win), shown by
--help, mirrored by examples/presets/paper.yaml, and a 2-step smoke run on a tiny local model and corpus."""

import json
from pathlib import Path

import pytest
import yaml

from hf_mrp.errors import MRPUserError
from hf_mrp.research import cli
from hf_mrp.research.commands.refine import parse_arguments
from hf_mrp.research.presets import PAPER, resolve

ROOT = Path(__file__).resolve().parents[2]


# Tolerances: every pytest.approx here compares float64 arithmetic on the same numbers in another order (a logged
# learning rate: the warm-up's first is exactly 0): within n 2^-53 of them (n = 1); pytest.approx's default (rel 1e-6)
# is nowhere near that limit on any machine.


def test_the_examples_config_is_the_built_in_preset():
    assert yaml.safe_load((ROOT / "examples" / "presets" / "paper.yaml").read_text()) == PAPER


def test_help_shows_the_presets_values_as_defaults(capsys):
    assert cli.main(["refine", "--preset", "paper", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, value in [
        ("max_steps", "1000"),
        ("learning_rate", "2e-05"),
        ("gradient_accumulation_steps", "16"),
        ("block_size", "2048"),
        ("warmup_steps", "50"),
        ("mrp_margin_threshold", "1.0"),
        ("mrp_objective", "margin"),
        ("split", "train"),
        ("use_lora", "False"),
    ]:
        section = text.split(f"--{flag} ", 2)[-1]
        assert f"(default: {value})" in section.split("--")[0] + section, flag
    assert "paper (the paper's released run files): model=Qwen/Qwen3.5-4B-Base" in text
    assert cli.main(["refine", "--help"]) == 0
    assert "(default: 60)" in " ".join(capsys.readouterr().out.split())  # without the preset: refine's own


def test_the_preset_sets_defaults_and_explicit_flags_win_in_any_order():
    _, data, refine_args, config = parse_arguments(["--preset", "paper", "--use_cpu", "true", "--report_to", "none"])
    assert (config.max_steps, config.learning_rate, config.gradient_accumulation_steps) == (1000, 2e-5, 16)
    assert (config.per_device_train_batch_size, config.warmup_steps, config.weight_decay) == (1, 50, 0.01)
    assert config.gradient_checkpointing and not config.use_lora
    assert (config.mrp_objective, config.mrp_lambda, config.mrp_margin_threshold) == ("margin", 1.0, 1.0)
    assert (data.dataset, data.dataset_config, data.split, data.block_size) == (
        "wikitext",
        "wikitext-103-raw-v1",
        "train",
        2048,
    )
    assert config.bf16 == resolve(PAPER)["bf16"]
    assert refine_args.audit_positions == 256_577
    for argv in (["--max_steps", "7", "--preset", "paper"], ["--preset=paper", "--max_steps", "7"]):
        _, _, _, config = parse_arguments([*argv, "--use_cpu", "true", "--report_to", "none"])
        assert (config.max_steps, config.learning_rate) == (7, 2e-5)
    with pytest.raises(MRPUserError, match="unknown preset 'papr'"):
        parse_arguments(["--preset", "papr"])
    with pytest.raises(MRPUserError, match="given 2 times"):
        parse_arguments(["--preset", "paper", "--preset", "paper"])


def test_a_preset_file_with_an_unknown_flag_is_refused(tmp_path):
    (tmp_path / "bad.yaml").write_text("max_step: 3\n")
    with pytest.raises(MRPUserError, match="sets 'max_step', which is no flag"):
        parse_arguments(["--preset", str(tmp_path / "bad.yaml")])


def test_the_paper_preset_runs_two_steps_on_a_tiny_model(tiny_model_dir, tmp_path):
    from pydoc_data.topics import topics

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(list(topics.values())[:12]))
    out = tmp_path / "out"
    code = cli.main(
        [
            "refine",
            "--preset",
            "paper",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(corpus),
            "--block_size",
            "32",
            "--max_positions",
            "1000",
            "--audit_positions",
            "62",
            "--max_steps",
            "2",
            "--output_dir",
            str(out),
            "--use_cpu",
            "true",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--logging_steps",
            "1",
        ]
    )
    assert code == 0
    settings = json.loads((out / "mrp_config.json").read_text())
    assert (settings["gradient_accumulation_steps"], settings["learning_rate"], settings["use_lora"]) == (
        16,
        2e-5,
        False,
    )
    assert settings["gradient_checkpointing"] and settings["mrp_objective"] == "margin"
    steps = [row for row in json.loads((out / "training_log.json").read_text()) if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2]
    assert steps[0]["learning_rate"] == pytest.approx(0.0) and steps[1]["learning_rate"] > 0  # the warm-up
    assert (out / "model.safetensors").exists()  # the whole model was trained and saved (no adapter)
    assert json.loads((out / "comparison" / "flip_audit.json").read_text())["n_positions"] == 62
    assert (out / "paper_curves.png").is_file()  # the preset draws the run's curves over the released runs'
    protocol = json.loads((out / "paper_protocol.json").read_text())
    assert protocol["curve"]["step"] == [1.0, 2.0]
    departed = {item["setting"]: item["this_run"] for item in protocol["departures"]}
    assert departed["max_steps"] == 2 and departed["block_size"] == 32 and "learning_rate" not in departed
