"""Issue 15: owned output folders, atomic saves of the adapter and tokenizer, identity of positions.

Runs are `hf-mrp refine` on a tiny Llama saved with the embedded SmolLM2 tokenizer (tiny_model_dir):
two at once into one folder, a rerun into a finished folder, a disk that fills up while the adapter is
saved (a stand-in writer that raises ENOSPC; a real small tmpfs too where this machine may mount one).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hf_mrp.research import cli
from hf_mrp.research.run_folders import run_is_whole
from hf_mrp.storage.locks import LOCK_FILE

from helpers import TINY_AUDIT, boundary_process, file_hashes, flags, folder_held_elsewhere, staging_beside

ROOT = Path(__file__).resolve().parents[2]
REFINE = flags(
    block_size=32,
    max_positions=124,
    audit_positions=31,
    max_steps=2,
    lora_layers="1-2",
    use_cpu="true",
    disable_tqdm="true",
    report_to="none",
)
SAVED = ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json")


def _partial_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*") if p.name != LOCK_FILE]


def _refine_process(model_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hf_mrp.research.cli",
            "refine",
            *flags(model=model_dir, output_dir=out),
            *REFINE,
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["refine", "--model", str(tiny_model_dir), "--output_dir", str(out), *REFINE]) == 0
    return out


def test_two_refines_into_one_folder_one_runs_the_other_stops_at_once(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    started = time.monotonic()
    first, second = (_refine_process(tiny_model_dir, out, "--max_steps", "40") for _ in range(2))
    ended = {}
    while len(ended) < 2:
        for name, process in (("first", first), ("second", second)):
            if name not in ended and process.poll() is not None:
                ended[name] = time.monotonic() - started
        time.sleep(0.05)
    results = {
        name: (process.returncode, *process.communicate()) for name, process in (("first", first), ("second", second))
    }
    winners = [name for name, (code, _, _) in results.items() if code == 0]
    losers = [name for name, (code, _, _) in results.items() if code != 0]
    assert len(winners) == 1 and len(losers) == 1, {k: v[2][-1500:] for k, v in results.items()}
    code, _, err = results[losers[0]]
    winner_pid = (first if winners[0] == "first" else second).pid
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert last.startswith("hf-mrp refine: error: output_dir")
    assert f"is in use by another run (pid {winner_pid} on" in last
    assert "hf_mrp.research.cli refine" in last or "hf-mrp refine" in last  # the holder's command is named
    assert ended[losers[0]] < 10, ended  # the loser stops at once (its imports included)
    assert ended[losers[0]] < ended[winners[0]]
    # the survivor's files are whole: a finished run that reads back, an adapter that loads
    assert run_is_whole(out)
    assert len(json.loads((out / "training_log.json").read_text())) >= 1
    from peft import PeftModel

    from helpers import tiny_llama

    PeftModel.from_pretrained(tiny_llama(vocab=49152), out)
    assert _partial_files(out) == []


def test_lock_dies_with_its_holder(tmp_path):
    """A killed run never leaves a stale lock: the kernel drops a flock when its holder exits."""
    from hf_mrp.errors import MRPUserError
    from hf_mrp.storage.locks import owned_folder

    with folder_held_elsewhere(tmp_path) as holder:
        with pytest.raises(MRPUserError, match=f"in use by another run \\(pid {holder.pid} on .*: holder\\)"):
            with owned_folder(tmp_path):
                pass
    with owned_folder(tmp_path):
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid()


def test_lock_file_never_holds_a_token(tmp_path):
    from hf_mrp.storage.locks import owned_folder

    with owned_folder(tmp_path, "hf-mrp refine --hub_token hf_SECRET --hub_model_id a/b --x_token=hf_OTHER"):
        text = (tmp_path / LOCK_FILE).read_text()
    assert "hf_SECRET" not in text and "hf_OTHER" not in text and "--hub_model_id a/b" in text


def test_overwrite_replaces_a_finished_run_without_reusing_its_audits(finished_run, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    old_blocks = json.loads((out / "audit_before" / "audit.json").read_text())["provenance"]
    assert old_blocks["block_size"] == 32
    argv = [
        "refine",
        "--model",
        str(tiny_model_dir),
        "--output_dir",
        str(out),
        *REFINE,
        "--block_size",
        "64",
        "--overwrite_output_dir",
        "true",
    ]
    assert cli.main(argv) == 0
    before = json.loads((out / "audit_before" / "audit.json").read_text())["provenance"]
    after = json.loads((out / "audit_after" / "audit.json").read_text())["provenance"]
    assert before["block_size"] == after["block_size"] == 64  # a fresh baseline, not the stale 32-token one
    assert before["blocks_sha256"] == after["blocks_sha256"] != old_blocks["blocks_sha256"]
    assert run_is_whole(out) and _partial_files(out) == []


def _fail_midway_with_enospc(tensors, filename, *args, **kwargs):
    """A stand-in safetensors writer on a disk that fills up: part of the file, then ENOSPC."""
    Path(filename).write_bytes(b"\0" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device", str(filename))


def test_full_disk_while_saving_the_adapter_keeps_the_previous_files(
    finished_run, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    import peft.peft_model

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    previous = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in SAVED}
    monkeypatch.setattr(peft.peft_model, "safe_save_file", _fail_midway_with_enospc)
    argv = [
        "refine",
        "--model",
        str(tiny_model_dir),
        "--output_dir",
        str(out),
        *REFINE,
        "--seed",
        "7",
        "--overwrite_output_dir",
        "true",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert last.startswith("hf-mrp refine: error: no space left on device while saving the adapter and tokenizer")
    assert "it needs about" in last and "is free; nothing was replaced" in last
    needed = float(last.split("it needs about ")[1].split(" ")[0].replace(",", ""))
    assert needed > 0
    # the previous adapter and tokenizer are byte-identical; no staging folder, no partial file
    assert {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in SAVED} == previous
    assert _partial_files(out) == []
    assert not (out / "training_log.json").exists()  # not finished: a rerun redoes it (no --overwrite needed)


def test_full_disk_while_writing_an_audit_plot_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import matplotlib.figure

    def full_disk(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    out = tmp_path / "audit"
    argv = [
        "audit",
        "--model",
        str(tiny_model_dir),
        "--output_dir",
        str(out),
        "--block_size",
        "32",
        "--max_positions",
        "62",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert "no space left on device while writing gap_curve.png" in last and "no partial file is left" in last
    assert not (out / "audit.json").exists() and not (out / "gap_curve.png").exists()
    assert _partial_files(out) == []


def _tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )


def test_a_really_full_small_filesystem_during_the_adapter_save(finished_run, tiny_model_dir, tmp_path, capsys):
    """The same on a real 5 MB tmpfs (root only): the tokenizer (3.5 MB) fits once, not twice."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "5m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "run"
        out.mkdir()
        for name in SAVED:  # the previous run's adapter and tokenizer, as a finished run holds them
            shutil.copy(finished_run / name, out / name)
        (out / "training_log.json").write_text("[]")
        previous = file_hashes(out)
        argv = [
            "refine",
            "--model",
            str(tiny_model_dir),
            "--output_dir",
            str(out),
            *REFINE,
            "--overwrite_output_dir",
            "true",
        ]
        code = cli.main(argv)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and "no space left on device" in last, last
        now = file_hashes(out)
        assert {name: now.get(name) for name in SAVED} == {name: previous[name] for name in SAVED}
        assert _partial_files(out) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_positions_identity_covers_block_shape_and_tokenizer(char_tokenizer):
    from hf_mrp.data import Blocks, make_blocks, tokenizer_identity

    ids = np.arange(64, dtype=np.int64)
    wide, narrow = Blocks(ids.reshape(1, 64), 62, "x"), Blocks(ids.reshape(2, 32), 62, "x")
    assert wide.fingerprint() != narrow.fingerprint()  # same ids, same count, other blocks
    assert (
        Blocks(ids.reshape(1, 64), 62, "x", "tok-a").fingerprint()
        != Blocks(ids.reshape(1, 64), 62, "x", "tok-b").fingerprint()
    )
    assert wide.fingerprint() == Blocks(ids.reshape(1, 64).copy(), 62, "other source").fingerprint()
    made = make_blocks(char_tokenizer, ["some text " * 20], block_size=16, max_positions=30)
    assert made.tokenizer == tokenizer_identity(char_tokenizer) != ""


def test_tokenizer_identity_is_the_id_to_token_table(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from hf_mrp.data import tokenizer_identity

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.save_pretrained(tmp_path / "copy")
    assert tokenizer_identity(AutoTokenizer.from_pretrained(tmp_path / "copy")) == tokenizer_identity(tokenizer)
    tokenizer.add_tokens(["<brand_new_token>"])
    assert tokenizer_identity(tokenizer) != tokenizer_identity(AutoTokenizer.from_pretrained(tmp_path / "copy"))


def test_a_finished_run_with_unreadable_files_is_unfinished(finished_run, tmp_path):
    assert run_is_whole(finished_run)
    damages = {
        "training_log.json": lambda path: path.write_text('[{"loss": 1.0, "st'),
        "audit_after/positions.parquet": lambda path: path.write_bytes(path.read_bytes()[:100]),
        "audit_after/blocks.npy": lambda path: path.unlink(),
        "comparison/flip_audit.json": lambda path: path.write_text(""),
    }
    for name, damage in damages.items():
        copy = tmp_path / name.replace("/", "_")
        shutil.copytree(finished_run, copy)
        damage(copy / name)
        assert not run_is_whole(copy), name


def test_sweep_redoes_a_run_whose_files_are_unreadable(ray_cluster, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        *flags(
            model=str(tiny_model_dir),
            output_dir=str(out),
            objectives="margin",
            lambdas="1",
            seeds="0",
            n_bootstrap="20",
            block_size="32",
            max_positions="124",
            audit_positions="31",
            max_steps="1",
            use_cpu="true",
            disable_tqdm="true",
            lora_layers="1-2",
        ),
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
    capsys.readouterr()
    damaged = out / "runs" / "margin_lam1_seed0" / "audit_after" / "positions.parquet"
    damaged.write_bytes(damaged.read_bytes()[:64])  # cut short, as a full disk or a bad copy leaves it
    assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
    again = capsys.readouterr().out
    assert "redoing unfinished run margin_lam1_seed0" in again and again.count("skipping finished run") == 1
    assert run_is_whole(out / "runs" / "margin_lam1_seed0")
    results = json.loads((out / "results.json").read_text())
    # a damaged shared baseline is audited again (same model, same blocks: the same numbers), not trusted
    (out / "baseline" / "blocks.npy").write_bytes(b"damaged")
    assert cli.main(argv) == 0
    third = capsys.readouterr().out
    assert "baseline: auditing 31 positions" in third and third.count("skipping finished run") == 2
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]


# ---------------------------------------------------------------- issue 22: audit folders owned like refine folders

AUDIT_BOUNDARIES = 7  # blocks.npy, positions.parquet, gap_curve.png, margins.png, audit.json; exchange before, after


def _audit(model_dir: Path, out: Path, *extra: str) -> int:
    return cli.main(["audit", "--model", str(model_dir), "--output_dir", str(out), *TINY_AUDIT, *extra])


def test_a_finished_audit_is_replaced_only_with_overwrite_and_then_whole(tiny_model_dir, tmp_path, capsys):
    from hf_mrp.audit.integrity import load_whole_audit

    out = tmp_path / "audit"
    assert _audit(tiny_model_dir, out, "--layers", "1-2") == 0
    (out / "notes.txt").write_text("the user's own file")
    before = file_hashes(out)
    capsys.readouterr()
    assert _audit(tiny_model_dir, out, "--max_positions", "93") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"hf-mrp audit: error: output_dir {out} holds a finished audit (audit.json, positions.parquet, "
        f"blocks.npy); nothing was changed. Pass another --output_dir, or --overwrite_output_dir true to "
        f"replace that audit"
    )
    assert file_hashes(out) == before
    assert _audit(tiny_model_dir, out, "--max_positions", "93", "--overwrite_output_dir", "true") == 0
    audit = load_whole_audit(out)
    assert audit.summary.n_positions == 93 and audit.layers is None
    assert not (out / "layers.json").exists() and not (out / "layers.png").exists()  # the old audit's, not kept
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert _partial_files(out) == [] and staging_beside(out) == []
    # the folder is still owned after the swap: its lock file is the one the run holds
    from hf_mrp.errors import MRPUserError
    from hf_mrp.storage.locks import owned_folder

    with folder_held_elsewhere(out):
        with pytest.raises(MRPUserError, match="in use by another run"):
            with owned_folder(out):
                pass


def test_sigkill_at_every_file_boundary_leaves_one_whole_audit(tiny_model_dir, tmp_path):
    """An audit into a finished audit folder, killed at each of its file boundaries: the folder is always one whole
    audit (the old one up to the exchange, the new one after it), and compare accepts it; a later run sweeps the
    staging folder the killed one left."""
    from hf_mrp.audit.compare import compare_dirs
    from hf_mrp.audit.integrity import load_whole_audit

    old = tmp_path / "old"
    assert _audit(tiny_model_dir, old) == 0
    old_files = file_hashes(old)
    folders = {k: tmp_path / f"killed_at_{k}" for k in range(1, AUDIT_BOUNDARIES + 1)}
    for folder in folders.values():
        shutil.copytree(old, folder)
    processes = {
        k: boundary_process(
            tmp_path, tiny_model_dir, folder, k, "--max_positions", "93", "--overwrite_output_dir", "true"
        )
        for k, folder in folders.items()
    }
    for k, process in processes.items():
        _, err = process.communicate(timeout=300)
        assert process.returncode == -9, (k, err[-2000:])
    for k, folder in folders.items():
        audit = load_whole_audit(folder)  # whole: its files agree with its audit.json
        if k < AUDIT_BOUNDARIES:
            assert file_hashes(folder) == old_files, k  # the old audit, byte for byte
        else:
            assert audit.summary.n_positions == 93 and file_hashes(folder) != old_files
        compare_dirs(folder, folder, tmp_path / f"cmp_{k}")
        assert (tmp_path / f"cmp_{k}" / "flip_audit.json").is_file()
        assert staging_beside(folder), k  # SIGKILL runs no clean-up ...
    folder = folders[3]
    assert _audit(tiny_model_dir, folder, "--overwrite_output_dir", "true") == 0
    assert staging_beside(folder) == [] and load_whole_audit(folder).summary.n_positions == 62  # ... the next does


def test_stale_staging_folders_of_dead_processes_are_swept_at_start(tmp_path):
    from hf_mrp.storage.locks import owned_folder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        out = tmp_path / "run"
        stale = [out / f".staging-{dead.pid}", tmp_path / f".run.staging-{dead.pid}"]
        kept = [out / f".staging-{alive.pid}", tmp_path / f".other.staging-{dead.pid}"]
        for folder in stale + kept:
            (folder / "sub").mkdir(parents=True)
            (folder / "sub" / "half.safetensors").write_bytes(b"\0" * 10)
        with owned_folder(out):
            assert [p.exists() for p in stale] == [False, False]
            assert [p.exists() for p in kept] == [True, True]  # a live run's, and another folder's
    finally:
        alive.kill()
        alive.wait()


def test_an_audit_into_the_current_folder_replaces_its_files_in_place(tiny_model_dir, tmp_path, monkeypatch):
    """``--output_dir .``: the folder cannot be exchanged away from under the process (and the shell) in it, so its
    files are replaced one by one, audit.json last; the folder itself stays the same one."""
    from hf_mrp.audit.integrity import load_whole_audit

    monkeypatch.chdir(tmp_path)
    inode = tmp_path.stat().st_ino
    assert _audit(tiny_model_dir, Path("."), "--layers", "1") == 0
    assert _audit(tiny_model_dir, Path("."), "--max_positions", "93", "--overwrite_output_dir", "true") == 0
    assert tmp_path.stat().st_ino == inode and Path.cwd() == tmp_path
    assert load_whole_audit(tmp_path).summary.n_positions == 93 and not (tmp_path / "layers.json").exists()
    assert _partial_files(tmp_path) == [] and not list(tmp_path.parent.glob(f".{tmp_path.name}.staging-*"))
