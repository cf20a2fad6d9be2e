"""`hf-mrp audit`: a run on a tiny saved model, and one clear line for each user error."""

import json
import subprocess
import sys

import pytest

from hf_mrp.research import cli
from hf_mrp.research.commands import COMMANDS


def run_cli(args, capsys):
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_audit_on_a_saved_model(tiny_model_dir, tmp_path, capsys):
    code, out, err = run_cli(
        [
            "audit",
            "--model",
            str(tiny_model_dir),
            "--block_size",
            "32",
            "--max_positions",
            "100",
            "--layers",
            "0-2",
            "--output_dir",
            str(tmp_path),
        ],
        capsys,
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "audit.json").read_text())
    assert summary["n_positions"] == 100 and "audited 100 positions" in out
    assert summary["provenance"]["arguments"]["block_size"] == 32
    assert (tmp_path / "layers.json").exists()


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "hf_mrp.research.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "audit" in out.stdout


@pytest.mark.parametrize(
    "argv",
    [[name, "--help"] for name in COMMANDS] + [["lens", "train", "--help"], ["refine", "--preset", "paper", "--help"]],
)
def test_every_command_prints_its_help(argv, capsys):
    """argparse %-formats each help string: a stray % in a field's help crashes --help."""
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "usage:" in captured.out


def test_compare_command(tmp_path, capsys, blocks):
    from hf_mrp.audit import run_audit
    from hf_mrp.data import Blocks

    from helpers import tiny_llama

    run_audit(tiny_llama(seed=0), blocks, output_dir=tmp_path / "before", progress=False)
    run_audit(tiny_llama(seed=1), blocks, output_dir=tmp_path / "after", progress=False)
    code, out, err = run_cli(
        ["compare", str(tmp_path / "before"), str(tmp_path / "after"), "--output_dir", str(tmp_path / "cmp")], capsys
    )
    assert code == 0, err
    result = json.loads((tmp_path / "cmp" / "flip_audit.json").read_text())
    assert f"W->R {result['w2r']}  R->W {result['r2w']}" in out
    assert (tmp_path / "cmp" / "flip_audit.md").exists() and (tmp_path / "cmp" / "gap_curves.png").exists()
    other = Blocks(blocks.input_ids[:, ::-1].copy(), blocks.n_positions, "reversed")
    run_audit(tiny_llama(seed=1), other, output_dir=tmp_path / "other", progress=False)
    code, _, err = run_cli(
        ["compare", str(tmp_path / "before"), str(tmp_path / "other"), "--output_dir", str(tmp_path / "cmp2")], capsys
    )
    assert code == 2 and "not of the same positions" in err.strip().splitlines()[-1]


def test_a_command_leaves_the_process_group_it_joined(monkeypatch, capsys):
    """A finished command destroys its process group (as Trainer.end() does): a gloo process that exits with its
    group alive while a peer still runs can abort (SIGABRT), failing a job that finished. A failed one keeps it
    (its peers may never reach a barrier; torchrun ends them)."""
    import torch.distributed as dist

    def joins(command: str, argv: list[str]) -> None:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        if argv:
            raise cli.MRPUserError("a bad flag")

    monkeypatch.setattr(cli, "run_command", joins)
    try:
        assert cli.main(["audit"]) == 0 and not dist.is_initialized()
        assert cli.main(["audit", "--bad"]) == 2 and dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
