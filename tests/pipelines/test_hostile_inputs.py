"""What a hostile probe of the CLI found (issue 25, item 5): each case is refused in one line, or interrupted, and
leaves on disk exactly what was there.

CLI (`hf_mrp.research.cli.main`, in this process): a refusal returns 2 and its last stderr line is
`hf-mrp <cmd>: error: ...`, with no traceback. "Before loading anything" is checked by replacing the model loader
with one that fails the test when called.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from hf_mrp.research import cli

from helpers import TINY_AUDIT, file_hashes, flags, one_torch_thread, staging_beside

# A two-step refine of the tiny model that saves checkpoint-2 (the run the resume cases resume).
REFINE = flags(
    block_size="32",
    max_positions="248",
    audit_positions="62",
    max_steps="2",
    per_device_train_batch_size="2",
    save_strategy="steps",
    save_steps="2",
    logging_steps="1",
    lora_layers="1-2",
    lora_r="16",
    mrp_objective="fisher",
    mrp_lambda="0.6",
    seed="0",
    use_cpu="true",
    disable_tqdm="true",
    report_to="none",
)


def _refused(argv: list[str], capsys) -> str:
    """Run ``hf-mrp ARGV``; it must be refused in one line (exit 2, no traceback): that line."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"hf-mrp {argv[0]}: error: "), last
    return last


def _no_model_loading(monkeypatch) -> None:
    """Every command's model loader fails the test: what is refused here must be refused before it."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    modules = [importlib.import_module(f"hf_mrp.research.{name}") for name in ("loading", "refine", "audit_run")]
    for module in modules:  # all imported first: one imported while loading's is replaced would keep the stand-in
        monkeypatch.setattr(module, "load_model_from_arguments", load)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A finished two-step refine run with its checkpoint-2 (each test works on a copy)."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    with one_torch_thread():
        assert cli.main(["refine", *flags(model=tiny_model_dir, output_dir=out), *REFINE]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# ---------------------------------------------------------------- resuming under other settings


@pytest.mark.parametrize(
    "flag, value, saved",
    [
        ("lora_r", "8", "16"),  # the adapter's shapes: a size-mismatch traceback before
        ("lora_layers", "0-1", "1-2"),  # the optimizer's parameter groups: a traceback before
        ("mrp_lambda", "0.3", "0.6"),  # ran silently, recording only the new lambda
        ("mrp_objective", "margin", "fisher"),
        ("mrp_margin_threshold", "2.0", "1.0"),
    ],
)
def test_resuming_under_other_lora_or_loss_settings_is_refused_before_loading(
    finished_run, tiny_model_dir, tmp_path, capsys, monkeypatch, flag, value, saved
):
    out = _copy(finished_run, tmp_path)
    before = file_hashes(out)
    _no_model_loading(monkeypatch)
    checkpoint = out / "checkpoint-2"
    argv = ["refine", *flags(model=tiny_model_dir, output_dir=out), *REFINE]
    last = _refused([*argv, "--resume_from_checkpoint", str(checkpoint), f"--{flag}", value], capsys)
    assert f"checkpoint {checkpoint} was trained with --{flag} {saved}, but this run passes --{flag} {value}" in last
    assert f"resume with --{flag} {saved}, or start a new run" in last
    assert file_hashes(out) == before  # nothing written, nothing removed
    assert not list(out.rglob(".*staging-*"))


def test_resuming_under_the_same_settings_passes_the_check(finished_run, tmp_path):
    """The check compares like with like: the saved settings of the run itself are accepted (a list of target
    modules and a missing lora_layers included)."""
    from hf_mrp.training import MRPConfig
    from hf_mrp.training.checkpoints import check_resumed_settings

    out = _copy(finished_run, tmp_path)
    saved = json.loads((out / "checkpoint-2" / "mrp_config.json").read_text())  # each checkpoint records them
    config = MRPConfig(
        output_dir=str(out),
        use_cpu=True,
        report_to="none",
        **{key: saved[key] for key in ("lora_r", "lora_layers", "lora_target_modules", "mrp_objective", "mrp_lambda")},
    )
    check_resumed_settings(config, str(out / "checkpoint-2"))
    check_resumed_settings(config, True)  # the last complete checkpoint


# ---------------------------------------------------------------- a JSON-lines file that is not UTF-8


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_table_that_is_not_utf8_is_named_with_its_line(tiny_model_dir, tmp_path, capsys, suffix):
    rows = [json.dumps({"text": f"line {i} " * 20}).encode() for i in range(6)]
    if suffix == ".csv":
        rows = [b"text"] + [f"line {i} ".encode() * 20 for i in range(6)]
    rows[3] = rows[3].replace(b"line", b"caf\xe9", 1)  # latin-1, on line 4
    data = tmp_path / f"latin1{suffix}"
    data.write_bytes(b"\n".join(rows) + b"\n")
    offset = len(b"\n".join(rows[:3])) + 1 + rows[3].index(b"\xe9")
    out = tmp_path / "new" / "audit"
    argv = ["audit", *flags(model=tiny_model_dir, output_dir=out, dataset=data), *TINY_AUDIT]
    last = _refused(argv, capsys)
    assert f"cannot read {data} as utf-8: invalid byte 0xe9 on line 4 (byte offset {offset})" in last
    assert "re-encode it" in last and "--encoding / --encoding_errors" in last
    assert not (tmp_path / "new").exists()  # the refused command leaves no folder behind


# ---------------------------------------------------------------- a damaged adapter for `hf-mrp downstream`


def _truncate(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _damage_config(folder: Path) -> None:
    text = (folder / "adapter_config.json").read_text()
    (folder / "adapter_config.json").write_text(text[: len(text) // 2])


def _not_peft(folder: Path) -> None:
    (folder / "adapter_config.json").write_text(json.dumps({"r": 16}))


def _header_only(folder: Path) -> None:
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"{}")


def _list_header(folder: Path) -> None:
    (folder / "adapter_model.safetensors").write_bytes((2).to_bytes(8, "little") + b"[]")


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason='needs lm-eval: pip install "hf_mrp[eval]"')
@pytest.mark.parametrize(
    "damage, file, message",
    [
        (_truncate, "adapter_model.safetensors", "is damaged: it holds"),
        (_header_only, "adapter_model.safetensors", "is damaged (its header does not read"),
        (_list_header, "adapter_model.safetensors", "is damaged (its header does not read"),
        (_damage_config, "adapter_config.json", "is damaged (not valid JSON"),
        (_not_peft, "adapter_config.json", "is no PEFT config (it lacks peft_type)"),
    ],
    ids=["truncated-weights", "bad-header", "list-header", "cut-config", "not-peft-config"],
)
def test_a_damaged_adapter_is_named_before_anything_loads(
    finished_run, tiny_model_dir, tmp_path, capsys, monkeypatch, damage, file, message
):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(finished_run / name, adapter / name)
    damage(adapter)
    before = file_hashes(adapter)
    _no_model_loading(monkeypatch)
    out = tmp_path / "downstream"
    tasks = Path(__file__).resolve().parents[1] / "fixtures" / "downstream_tasks"  # local: checked before loading
    argv = ["downstream", *flags(model=tiny_model_dir, adapter=adapter, output_dir=out, tasks="mrp_toy_choice")]
    argv += ["--include_path", str(tasks)]
    last = _refused(argv, capsys)
    assert f"the adapter's {adapter / file} {message}" in last
    assert "write the adapter again" in last and "base model" not in last
    assert file_hashes(adapter) == before and not out.exists()


# ---------------------------------------------------------------- refine's own audits appear whole


def test_ctrl_c_during_refines_after_audit_leaves_no_partial_audit(tiny_model_dir, tmp_path, capsys):
    """The after-audit is staged and swapped in whole, like `hf-mrp audit`'s: stopped while its files are written, it
    leaves no audit_after/ at all (not two files without audit.json), and the before-audit as it was."""
    from unittest import mock

    from hf_mrp.audit import geometry
    from hf_mrp.research.run_folders import audit_is_whole

    out = tmp_path / "run"
    draw = geometry.plots.plot_margin_histograms
    calls = []

    def draw_then_stop(*args, **kwargs):  # the before-audit draws it first, the after-audit second
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return draw(*args, **kwargs)

    argv = ["refine", *flags(model=tiny_model_dir, output_dir=out), *REFINE]
    with one_torch_thread(), mock.patch.object(geometry.plots, "plot_margin_histograms", draw_then_stop):
        code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("hf-mrp refine: interrupted")
    assert len(calls) == 2 and ".audit_after.staging-" in str(calls[1])  # stopped mid-write of the after-audit
    assert not (out / "audit_after").exists() and not (out / "training_log.json").exists()
    assert audit_is_whole(out / "audit_before")
    assert not list(out.rglob(".*staging-*")) and staging_beside(out / "audit_after") == []


# ---------------------------------------------------------------- refused before any work: nothing is created


@pytest.mark.parametrize("known_locally", [True, False], ids=["from-config.json", "after-loading"])
def test_out_of_range_audit_layers_is_refused_before_any_folder_exists(
    tiny_model_dir, tmp_path, capsys, monkeypatch, known_locally
):
    """Refused from the model's config.json before anything loads; where that cannot tell (a Hub id, a GGUF
    file), once the model has loaded but before any audit folder exists."""
    if known_locally:
        _no_model_loading(monkeypatch)
    else:
        monkeypatch.setattr("hf_mrp.models.loading.local_config_number", lambda model, key: None)
    out = tmp_path / "new" / "run"
    argv = ["refine", *flags(model=tiny_model_dir, output_dir=out), *REFINE, "--audit_layers", "0-9"]
    with one_torch_thread():
        last = _refused(argv, capsys)
    assert f"--audit_layers 0-9 does not fit {tiny_model_dir}: layer index 3 is out of range: the model has 3 " in last
    assert not (tmp_path / "new").exists()  # neither the run folder, its lock, nor an empty audit_before/


def test_a_refused_command_leaves_no_folder_it_created_and_no_lock_in_one_it_did_not(tiny_model_dir, tmp_path, capsys):
    """Refused once the model has loaded (the data file is looked for then): the lock file goes, and the folders the
    command created (all of a/b/out) with it."""
    missing = tmp_path / "no_such.jsonl"
    created, existing = tmp_path / "a" / "b" / "out", tmp_path / "existing"
    existing.mkdir()
    for out in (created, existing):
        argv = ["audit", *flags(model=tiny_model_dir, output_dir=out, dataset=missing), *TINY_AUDIT]
        assert "data file not found" in _refused(argv, capsys)
    assert not (tmp_path / "a").exists()
    assert list(existing.iterdir()) == []  # the folder stays (it was there), without a lock file


def test_a_lock_on_a_file_its_last_holder_removed_is_taken_again(tmp_path, monkeypatch):
    """The last holder removes an unused lock file (and the folder it made) while holding it: a run that opened the
    file just before and flocks it just after would hold a lock on a deleted file, beside a second run that locks
    the new one. Such a lock is taken again on the file now at the path."""
    import fcntl

    from hf_mrp.storage.locks import LOCK_FILE, owned_folder

    out, real_flock, calls = tmp_path / "out", fcntl.flock, []

    def flock(fd, operation):
        if not calls:  # between this run's open and its flock, the last holder cleans up
            (out / LOCK_FILE).unlink()
            out.rmdir()
        calls.append(fd)
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with owned_folder(out):
        assert len(calls) == 2 and (out / LOCK_FILE).is_file()
        with open(out / LOCK_FILE) as other, pytest.raises(BlockingIOError):  # the file at the path is held
            real_flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not out.exists()  # created by this run, and left empty: removed


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason='needs lm-eval: pip install "hf_mrp[eval]"')
def test_a_refused_downstream_leaves_no_output_folder(finished_run, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """downstream takes no lock; its folder appears with the report, so a refusal (here an unknown task) leaves none."""
    _no_model_loading(monkeypatch)
    tasks = Path(__file__).resolve().parents[1] / "fixtures" / "downstream_tasks"
    out = tmp_path / "downstream"
    argv = ["downstream", *flags(model=tiny_model_dir, adapter=finished_run, output_dir=out, tasks="mrp_toy_choise")]
    last = _refused([*argv, "--include_path", str(tasks)], capsys)
    assert "unknown task 'mrp_toy_choise'" in last
    assert not out.exists()
