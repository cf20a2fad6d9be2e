"""Reliability: resume after a kill, non-finite batches, atomic outputs, safe loading, determinism.

The refine runs here are `examples/refine.py` subprocesses on a tiny Llama saved with the embedded
SmolLM2 tokenizer (the pattern of tests/research/test_refine.py), one thread each, so that they can run side
by side and still be bit-for-bit comparable.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_mrp.errors import MRPUserError
from hf_mrp.storage import files

from helpers import (
    FAKE_TOKEN,
    VOCAB,
    WriteAfterUpdate,
    assert_refuses_bad_checkpoints,
    config,
    flags,
    free_port,
    nan_into_lora,
    one_torch_thread,
    tiny_llama,
    with_callback,
    zero_final_norm,
)

ROOT = Path(__file__).resolve().parents[2]
REFINE_ARGS = flags(
    block_size="32",
    max_positions="248",
    audit_positions="62",
    max_steps="6",
    per_device_train_batch_size="2",
    save_strategy="steps",
    save_steps="2",
    logging_steps="1",
    lora_layers="1-2",
    learning_rate="1e-2",
    seed="0",
    use_cpu="true",
    disable_tqdm="true",
    hub_token=FAKE_TOKEN,  # never pushed: only to check that no written file holds it
)
# Runs a script like `python script.py ARGS`, but blocks for good right after the checkpoint of step
# $PAUSE_AT_STEP is on disk (and says so in $PAUSE_MARKER), so the test can SIGKILL it mid-training.
PAUSE_WRAPPER = """
import os, runpy, sys, time
from pathlib import Path
from transformers.trainer_callback import CallbackHandler

on_save = CallbackHandler.on_save

def pausing_on_save(self, args, state, control):
    control = on_save(self, args, state, control)
    if state.global_step == int(os.environ["PAUSE_AT_STEP"]):
        Path(os.environ["PAUSE_MARKER"]).write_text(str(state.global_step))
        time.sleep(600)
    return control

CallbackHandler.on_save = pausing_on_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _env(**extra) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": FAKE_TOKEN,
        **extra,
    }


def _start_refine(model_dir: Path, output_dir: Path, *extra: str, wrapper: Path | None = None, env=None):
    script = [*([str(wrapper)] if wrapper else []), str(ROOT / "examples" / "refine.py")]
    command = [sys.executable, *script, *flags(model=model_dir, output_dir=output_dir), *REFINE_ARGS, *extra]
    log = open(output_dir.parent / f"{output_dir.name}.log", "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env or _env()), log


def _refine_in_this_process(model_dir: Path, output_dir: Path) -> None:
    """The same run without a new interpreter (saves ~7 s of imports); one thread, like the subprocesses."""
    from hf_mrp.research.commands import refine as refine_command

    with one_torch_thread():
        refine_command.main(
            *refine_command.parse_arguments([*flags(model=model_dir, output_dir=output_dir), *REFINE_ARGS])
        )


def _finish(process, log, timeout=300) -> str:
    try:
        code = process.wait(timeout=timeout)
    finally:
        log.close()
    text = Path(log.name).read_text()
    assert code == 0, text[-3000:]
    return text


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _numbers(value, prefix="") -> dict[str, float]:
    """Every numeric leaf of a JSON document, by path (provenance left out: it names the output folder)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key != "provenance":
                out.update(_numbers(item, f"{prefix}/{key}"))
        return out
    if isinstance(value, list):
        out = {}
        for index, item in enumerate(value):
            out.update(_numbers(item, f"{prefix}[{index}]"))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: float(value)}
    return {}


def _assert_same_adapter(a: dict, b: dict) -> None:
    """Equal to the bit: the callers compare the same computation (see each)."""
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_killed_refine_resumes_to_the_same_adapter_and_audit_and_runs_are_reproducible(tiny_model_dir, tmp_path):
    """SIGKILL after checkpoint-2 (of 6 steps), resume from it: same adapter and audit as an uninterrupted
    run. Two uninterrupted runs with the same seed agree too (fixed-seed reproducibility on CPU)."""
    wrapper = tmp_path / "pause_after_checkpoint.py"
    wrapper.write_text(PAUSE_WRAPPER)
    marker = tmp_path / "paused"
    full, again, killed = tmp_path / "full", tmp_path / "again", tmp_path / "killed"
    runs = [_start_refine(tiny_model_dir, full)]
    victim, victim_log = _start_refine(
        tiny_model_dir, killed, wrapper=wrapper, env=_env(PAUSE_AT_STEP="2", PAUSE_MARKER=str(marker))
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert victim.poll() is None, Path(victim_log.name).read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached checkpoint-2"
            time.sleep(0.1)
        assert (killed / "checkpoint-2" / "trainer_state.json").is_file()
    finally:
        victim.send_signal(signal.SIGKILL)  # no clean-up runs: as if the machine went away
        victim.wait(timeout=60)
        victim_log.close()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "adapter_model.safetensors").exists() and not (killed / "audit_after").exists()
    assert (killed / "audit_before" / "audit.json").is_file()

    runs.append(_start_refine(tiny_model_dir, killed, "--resume_from_checkpoint", str(killed / "checkpoint-2")))
    try:
        _refine_in_this_process(tiny_model_dir, again)  # the second fixed-seed run, meanwhile
        logs = [_finish(*run) for run in runs]
    finally:
        for process, _ in runs:  # leave nothing running when an assertion fails
            if process.poll() is None:
                process.kill()
                process.wait(timeout=60)
    assert all(FAKE_TOKEN not in text for text in logs)

    # Exact, not within a tolerance: the same computation (one thread each, the same seed, the same shapes; the
    # checkpoint restores weights, AdamW's state and the RNG exactly). No rounding bound would do instead: AdamW's
    # step lr m / (sqrt(v) + eps) turns a last-bit gradient difference of a weight whose gradient is ~0 into up to lr.
    reference = _adapter(full)
    _assert_same_adapter(reference, _adapter(again))  # reproducible
    _assert_same_adapter(reference, _adapter(killed))  # resumed == uninterrupted
    before = _numbers(json.loads((full / "audit_after" / "audit.json").read_text()))
    assert before and before["/n_positions"] == 62
    for run in (again, killed):
        after = _numbers(json.loads((run / "audit_after" / "audit.json").read_text()))
        assert after.keys() == before.keys()
        for key, value in before.items():
            assert after[key] == value, key
        flips = _numbers(json.loads((run / "comparison" / "flip_audit.json").read_text()))
        assert flips == _numbers(json.loads((full / "comparison" / "flip_audit.json").read_text()))
    losses = {
        run.name: {
            row["step"]: row["loss"] for row in json.loads((run / "training_log.json").read_text()) if "loss" in row
        }
        for run in (full, killed)
    }
    assert sorted(losses["killed"]) == list(range(1, 7))
    assert losses["killed"] == losses["full"]
    # the Hub token reaches no written file: configs, model card, reports, nor any checkpoint's training_args.bin
    for run in (full, killed):
        for path in run.rglob("*"):
            if path.is_file():
                assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    saved = torch.load(killed / "checkpoint-6" / "training_args.bin", weights_only=False)
    assert saved.hub_token is None and saved.seed == 0


def test_resume_from_a_missing_or_incomplete_checkpoint_is_refused(tmp_path):
    from hf_mrp.training import MRPConfig, MRPTrainer

    args = MRPConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1, disable_tqdm=True)
    assert_refuses_bad_checkpoints(MRPTrainer(model=tiny_llama(), args=args, train_dataset=_dataset()), tmp_path)


# ---------------------------------------------------------------- non-finite batches


def _dataset(rows=4, length=12, weights=None) -> Dataset:
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(rows, length))
    data = {"input_ids": ids.tolist(), "labels": ids.tolist()}
    if weights is not None:
        data["mrp_weights"] = weights
    return Dataset.from_dict(data)


def _trainer(tmp_path, dataset, **overrides):
    from hf_mrp.training import MRPTrainer

    run = dict(
        max_steps=4,
        per_device_train_batch_size=1,
        mrp_objective="margin",
        mrp_lambda=0.5,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
    )
    return MRPTrainer(model=tiny_llama(), args=config(tmp_path, **{**run, **overrides}), train_dataset=dataset)


@pytest.mark.parametrize("bad_value, accumulation", [(float("nan"), 1), (float("inf"), 2)])
def test_nonfinite_batch_is_skipped_counted_and_never_reaches_the_adapter(tmp_path, caplog, bad_value, accumulation):
    rows = 4 * accumulation  # 4 steps = one epoch: every row is seen once
    weights = [[1.0] * 12 for _ in range(rows)]
    weights[2][5] = bad_value  # one row: its objective (and so its loss) is NaN / inf
    trainer = _trainer(tmp_path, _dataset(rows, weights=weights), gradient_accumulation_steps=accumulation)
    with caplog.at_level(logging.WARNING, logger="hf_mrp.training.trainer"):
        trainer.train()
    skipped = [r for r in caplog.records if "not finite" in r.getMessage()]
    assert len(skipped) == 1  # one warning per skipped batch
    steps = [row for row in trainer.state.log_history if "loss" in row]
    assert len(steps) == 4 and steps[-1]["nonfinite_skipped"] == 1
    assert [row["nonfinite_skipped"] for row in steps] == sorted(row["nonfinite_skipped"] for row in steps)
    for row in steps:
        for key in ("loss", "loss_ce", "loss_mrp", "mean_margin", "grad_norm"):
            assert key not in row or math.isfinite(row[key]), (key, row)
    assert sum("loss_ce" in row for row in steps) >= 3  # a step of one skipped batch has no MRP means
    adapter = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert adapter and all(torch.isfinite(p).all() for p in adapter.values())
    assert any(p.abs().sum() > 0 for n, p in adapter.items() if "lora_B" in n)  # the other batches trained it


def test_skipped_batch_contributes_exactly_nothing(tmp_path):
    """Accumulating a finite and a NaN micro-batch gives the finite one's gradient (over the step's items)."""
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(2, 12))
    weights = [[1.0] * 12, [float("nan")] * 12]
    trainer = _trainer(tmp_path, _dataset(2), max_steps=1, use_lora=False)
    model = trainer.model
    model.train()
    batches = [
        {
            "input_ids": torch.as_tensor(ids[i : i + 1]),
            "labels": torch.as_tensor(ids[i : i + 1]),
            "mrp_weights": torch.tensor([weights[i]]),
        }
        for i in range(2)
    ]
    items = torch.tensor(22)
    trainer.current_gradient_accumulation_steps = 2
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    losses = [trainer.training_step(model, dict(batch), items) for batch in batches]
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert losses[1].item() == 0.0 and math.isfinite(losses[0].item()) and int(trainer._nonfinite_counts[0]) == 1
    model.zero_grad()
    trainer.training_step(model, dict(batches[0]), items)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, rtol=0, atol=0, msg=name)


def test_all_processes_agree_to_skip(tmp_path, monkeypatch):
    """When another process reports a non-finite loss, this one skips its (finite) batch too."""
    trainer = _trainer(tmp_path, _dataset(4), max_steps=2)
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    other = {"nonfinite": 0.0}

    def reduce(tensor, reduction="sum"):  # the other process's sums: finite numbers, plus its flag
        remote = tensor.clone()
        remote[-1] = other["nonfinite"]
        return tensor + remote

    monkeypatch.setattr(trainer.accelerator, "reduce", reduce)
    model = trainer.model
    model.train()
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.current_gradient_accumulation_steps = 1
    batch = {"input_ids": torch.arange(12)[None] % VOCAB, "labels": torch.arange(12)[None] % VOCAB}
    assert trainer.training_step(model, dict(batch), torch.tensor(11)).item() != 0.0
    other["nonfinite"] = 1.0
    model.zero_grad()
    assert trainer.training_step(model, dict(batch), torch.tensor(11)).item() == 0.0
    assert int(trainer._nonfinite_counts[0]) == 1
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.slow  # torchrun processes
def test_two_processes_agree_to_skip_a_batch_only_one_of_them_sees(ddp_nan_batch):
    """2 CPU processes (gloo): one meets a NaN batch, both skip it, nothing hangs, replicas stay equal (the launch is
    shared with test_deepspeed's DDP reference: conftest.ddp_nan_batch)."""
    folder, run = ddp_nan_batch
    assert run.stderr.count("was not finite") == 1  # warned once (by the main process, at the log after it)
    logs = [json.loads((folder / f"log_rank{rank}.json").read_text()) for rank in (0, 1)]
    for log in logs:
        steps = [row for row in log if "loss" in row]
        assert len(steps) == 2 and steps[-1]["nonfinite_skipped"] == 1
        assert all(math.isfinite(row["grad_norm"]) for row in steps)
    adapters = [torch.load(folder / f"adapter_rank{rank}.pt") for rank in (0, 1)]
    assert all(torch.isfinite(p).all() for p in adapters[0].values())
    _assert_same_adapter(adapters[0], adapters[1])  # DDP: every process applies the same averaged gradient


# ---------------------------------------------------------------- atomic outputs


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_writer_that_fails_midway_leaves_no_file_and_no_temporary(tmp_path):
    def half_then_fail(temporary: Path) -> None:
        temporary.write_text("half of a report")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.write_with(tmp_path / "report.json", half_then_fail)
    with pytest.raises(TypeError):
        files.write_json(tmp_path / "audit.json", {"model": object()})  # not serializable: fails inside the write
    assert _leftovers(tmp_path) == []
    files.write_text(tmp_path / "old.md", "complete old report")
    with pytest.raises(RuntimeError):
        files.write_with(tmp_path / "old.md", half_then_fail)
    assert _leftovers(tmp_path) == ["old.md"] and (tmp_path / "old.md").read_text() == "complete old report"


def test_an_interrupted_audit_is_refused_by_load_audit_and_compare(tmp_path, monkeypatch, blocks):
    from hf_mrp.audit import geometry
    from hf_mrp.audit.compare import compare_dirs

    complete = geometry.run_audit(tiny_llama(), blocks, output_dir=tmp_path / "complete", progress=False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # stopped while drawing the plots, before audit.json

    monkeypatch.setattr(geometry.plots, "plot_margin_histograms", crash)
    with pytest.raises(KeyboardInterrupt):
        geometry.write_audit(complete, tmp_path / "interrupted")
    files = _leftovers(tmp_path / "interrupted")
    assert "audit.json" not in files and not [name for name in files if name.startswith(".")]
    with pytest.raises(MRPUserError, match="no complete audit \\(audit.json missing\\)"):
        geometry.load_audit(tmp_path / "interrupted")
    with pytest.raises(MRPUserError, match="no complete audit"):
        compare_dirs(tmp_path / "complete", tmp_path / "interrupted", tmp_path / "cmp")


def test_cli_ctrl_c_and_command_help(monkeypatch, capsys):
    from hf_mrp.research import cli

    def interrupted(command, argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_command", interrupted)
    assert cli.main(["audit"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "hf-mrp audit: interrupted (report files on disk are whole: each is written atomically)"
    ]
    monkeypatch.undo()
    assert cli.main(["compare", "--help"]) == 0 and "--output_dir" in capsys.readouterr().out


# ---------------------------------------------------------------- loading safely


def _capture_from_pretrained(monkeypatch) -> dict:
    import transformers

    calls = {}
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, source, *args, _original=original, _name=cls.__name__, **kwargs):
            calls[_name] = kwargs
            return _original(klass, source, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def _tiny_folder(folder: Path, tokenizer_from: Path | None = None, **save_kwargs) -> Path:
    tiny_llama().save_pretrained(folder, **save_kwargs)
    if tokenizer_from is not None:
        for file in tokenizer_from.glob("tokenizer*"):
            (folder / file.name).write_bytes(file.read_bytes())
    return folder


def test_remote_code_is_opt_in(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from hf_mrp.models import load_model_and_tokenizer
    from hf_mrp.research import cli

    calls = _capture_from_pretrained(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    code = cli.main(
        [
            "audit",
            "--model",
            str(tiny_model_dir),
            "--block_size",
            "32",
            "--max_positions",
            "62",
            "--output_dir",
            str(tmp_path / "audit"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert FAKE_TOKEN not in captured.out + captured.err
    assert calls["AutoModelForCausalLM"]["trust_remote_code"] is False
    assert calls["AutoTokenizer"]["trust_remote_code"] is False
    assert calls["AutoModelForCausalLM"]["use_safetensors"] is True  # the folder has model.safetensors
    for path in (tmp_path / "audit").rglob("*"):
        assert FAKE_TOKEN.encode() not in path.read_bytes(), path

    # a folder whose config asks for its own code: never run by default, and the error names the opt-in flag
    remote = _tiny_folder(tmp_path / "remote", tiny_model_dir)
    config = json.loads((remote / "config.json").read_text())
    config.update(
        model_type="custom_mrp_test", auto_map={"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}
    )
    (remote / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "remote_code_ran"
    (remote / "custom.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    with pytest.raises(MRPUserError, match="ships its own Python code.*--trust_remote_code true"):
        load_model_and_tokenizer(str(remote))
    assert not ran.exists()


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_load_from_safetensors_or_weights_only_pickles(tiny_model_dir, tmp_path):
    from hf_mrp.models import load_model_and_tokenizer

    reference = tiny_llama()
    bin_only = tmp_path / "bin"
    reference.config.save_pretrained(bin_only)
    torch.save(reference.state_dict(), bin_only / "pytorch_model.bin")  # tensors only: weights_only accepts it
    for file in tiny_model_dir.glob("tokenizer*"):
        (bin_only / file.name).write_bytes(file.read_bytes())
    loaded, _, _ = load_model_and_tokenizer(str(bin_only))
    assert torch.equal(loaded.lm_head.weight, reference.lm_head.weight)

    marker = tmp_path / "pickle_ran"
    torch.save({"model.embed_tokens.weight": _RunsCode(str(marker))}, bin_only / "pytorch_model.bin")
    with pytest.raises(MRPUserError, match="refused to load the weights.*not a plain-tensor pickle.*weights_only=True"):
        load_model_and_tokenizer(str(bin_only))
    assert not marker.exists()

    # beside safetensors weights, a pickle is never even opened
    both = _tiny_folder(tmp_path / "both", tiny_model_dir)
    with open(both / "pytorch_model.bin", "wb") as handle:
        pickle.dump(_RunsCode(str(marker)), handle)
    loaded, _, _ = load_model_and_tokenizer(str(both))
    assert torch.equal(loaded.lm_head.weight, reference.lm_head.weight) and not marker.exists()


# ---------------------------------------------------------------- determinism


def test_same_audit_arguments_give_byte_identical_files(tiny_model_dir, tmp_path, capsys):
    from hf_mrp.research import cli

    args = [
        "audit",
        "--model",
        str(tiny_model_dir),
        "--block_size",
        "32",
        "--max_positions",
        "93",
        "--layers",
        "1-2",
        "--output_dir",
        str(tmp_path / "audit"),
        "--overwrite_output_dir",
        "true",
    ]
    contents = []
    for _ in range(2):
        assert cli.main(args) == 0, capsys.readouterr().err
        contents.append(
            {
                name: (tmp_path / "audit" / name).read_bytes()
                for name in ("audit.json", "layers.json", "positions.parquet", "blocks.npy")
            }
        )
    assert contents[0] == contents[1]
    summary = json.loads(contents[0]["audit.json"])

    def keys(value):
        if isinstance(value, dict):
            for key, item in value.items():
                yield key
                yield from keys(item)
        elif isinstance(value, list):
            for item in value:
                yield from keys(item)

    clock_words = ("time", "date", "second", "duration", "elapsed", "runtime", "host")
    assert not [key for key in keys(summary) if any(word in key.lower() for word in clock_words)]


# ---------------------------------------------------------------- issue 22: divergence is a failure


def _finite_adapter(checkpoint: Path) -> bool:
    return all(torch.isfinite(t).all() for t in _adapter(checkpoint).values())


def _refine_fails(argv: list[str], capsys) -> str:
    """Run `hf-mrp refine`; it must exit 2 with one line and no traceback. Returns that line."""
    from hf_mrp.research import cli

    with one_torch_thread():
        code = cli.main(["refine", *argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def _nothing_finished(out: Path) -> None:
    """No finished marker, no adapter, no after-audit or card; only the lock is hidden; not a whole run."""
    from hf_mrp.research.run_folders import run_is_whole

    assert not (out / "training_log.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert not (out / "audit_after").exists() and not (out / "README.md").exists()
    assert not [p for p in out.rglob(".*") if p.name != ".hf_mrp.lock"]
    assert not run_is_whole(out)


@pytest.mark.parametrize("max_steps", [6, 2])  # 6: caught at the next step; 2: the last update, caught after training
def test_a_diverged_run_fails_keeps_its_last_finite_checkpoint_and_is_not_finished(
    tiny_model_dir, tmp_path, capsys, monkeypatch, max_steps
):
    """A NaN written into the adapter right after the second update (deterministic, on any machine). The run stops
    with one line naming the step and the likely cause; the checkpoint saved after the NaN update is removed, the
    one before it is intact."""
    with_callback(monkeypatch, WriteAfterUpdate(2, nan_into_lora))
    out = tmp_path / "run"
    argv = [*flags(model=tiny_model_dir, output_dir=out), *REFINE_ARGS]
    last = _refine_fails([*argv, *flags(save_steps=1, max_steps=max_steps, report_to="none")], capsys)
    assert last.startswith(
        "hf-mrp refine: error: training diverged at step 2: its update made the trainable weights non-finite (NaN/inf)"
    ), last
    assert "learning_rate 0.01, mrp_lambda 0.6" in last and "lower --learning_rate" in last
    # the weights are checked before each save: no checkpoint of NaN weights is ever written, none is removed
    assert last.endswith(f"the last good checkpoint is {out / 'checkpoint-1'}"), last
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert _finite_adapter(out / "checkpoint-1")
    _nothing_finished(out)


def test_a_run_whose_model_ties_every_logit_after_training_fails(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The final norm zeroed by the second of three updates: one zero-gradient step only (under the limit), but the
    after-audit ties the top two logits everywhere. That is a collapsed run: one line, checkpoint-1 kept (its
    weights still had a gradient), the later ones removed, nothing finished."""
    with_callback(monkeypatch, WriteAfterUpdate(2, zero_final_norm))
    out = tmp_path / "run"
    argv = [*flags(model=tiny_model_dir, output_dir=out), *REFINE_ARGS]
    last = _refine_fails([*argv, *flags(save_steps=1, max_steps=3, report_to="none")], capsys)
    assert last.startswith(
        "hf-mrp refine: error: training collapsed at step 3: after training the model ties its top two logits at "
        "every audited position (mean margin exactly 0)"
    ), last
    assert f"the last good checkpoint is {out / 'checkpoint-1'} (checkpoint-2, checkpoint-3, saved after" in last
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    _nothing_finished(out)


def test_a_learning_rate_of_1e4_is_never_a_finished_run(tiny_model_dir, tmp_path, capsys):
    """What the run does at learning rate 1e4 depends on the machine's rounding (a NaN update on one CPU, every logit
    tied on another): either way it exits 2 with one line that says so, and nothing is marked finished."""
    out = tmp_path / "run"
    argv = [*flags(model=tiny_model_dir, output_dir=out), *REFINE_ARGS]
    last = _refine_fails([*argv, *flags(learning_rate="1e4", report_to="none")], capsys)
    assert last.startswith(
        ("hf-mrp refine: error: training diverged at step", "hf-mrp refine: error: training collapsed at step")
    ), last
    assert "learning_rate 10000, mrp_lambda 0.6" in last and "lower --learning_rate" in last
    _nothing_finished(out)


def test_a_loss_that_stays_non_finite_stops_the_run(tmp_path):
    """Every batch non-finite: skipped (no gradient) MAX_NONFINITE_STEPS steps in a row, then the run stops."""
    from hf_mrp.training.divergence import MAX_NONFINITE_STEPS, TrainingDiverged

    weights = [[float("nan")] * 12 for _ in range(8)]
    trainer = _trainer(tmp_path, _dataset(8, weights=weights), max_steps=8, gradient_accumulation_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with pytest.raises(
        TrainingDiverged,
        match=f"training diverged at step {MAX_NONFINITE_STEPS}: the loss or the MRP "
        f"objective was not finite .* for {2 * MAX_NONFINITE_STEPS} batches in "
        "a row .*no checkpoint of good weights was saved",
    ):
        trainer.train()
    assert trainer.state.global_step == MAX_NONFINITE_STEPS  # checked at the log after the third step
    for name, parameter in trainer.model.named_parameters():  # no skipped batch changed a weight
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.detach(), before[name], rtol=0, atol=0, msg=name)


def test_a_diverged_sweep_run_is_counted_as_failed(ray_cluster, tiny_model_dir, tmp_path, capsys):
    """lambda 1e38 overflows: that run fails (results.md says so, no row of zeros), its control is a finished row."""
    import json as json_module

    from hf_mrp.research import cli

    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "--output_dir",
        str(out),
        *flags(objectives="margin", lambdas="1e38", seeds=0, n_bootstrap=0, audit_blocks=2, model=tiny_model_dir),
        *REFINE_ARGS[:4],
        *flags(
            max_steps=4,
            save_strategy="no",
            lora_layers="1-2",
            learning_rate="1e-2",
            use_cpu="true",
            disable_tqdm="true",
            report_to="none",
        ),
    ]
    with one_torch_thread():
        code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err[-2000:]
    last = captured.err.strip().splitlines()[-1]
    results = json_module.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 1 and results["runs"][0]["control"]
    assert last == (
        f"hf-mrp sweep: error: 1 of 2 runs failed: {results['failed_runs'][0]['name']}; "
        "results.md lists them and why, the rows hold only the finished runs"
    ), last
    failed = results["failed_runs"]
    assert len(failed) == 1 and "training diverged at step" in failed[0]["reason"] and not results["missing_runs"]
    assert all(not row["objective"] == "margin" for row in results["rows"])  # only the control's row
    report = (out / "results.md").read_text()
    assert f"**FAILED (diverged, left out of every row):** {failed[0]['name']}: training diverged" in report
    run_dir = out / "runs" / failed[0]["name"]
    assert not (run_dir / "training_log.json").exists() and (run_dir / "sweep_failed.json").is_file()
    # a rerun keeps it as failed, trains nothing again, and says so
    assert cli.main(argv) == 2
    rerun = capsys.readouterr()
    assert (
        f"skipping failed run {failed[0]['name']}" in rerun.out and f"\ntraining {failed[0]['name']}" not in rerun.out
    )


# ---------------------------------------------------------------- issue 22: signals like Ctrl-C


INTERRUPTED = "interrupted (report files on disk are whole: each is written atomically)"


def test_sigterm_sighup_and_ctrl_c_print_one_line_and_leave_whole_files(tiny_model_dir, tmp_path):
    """An audit into a finished audit folder, stopped by each signal while its second file is in the staging folder:
    the same one line, exit code 128 + the signal, the old audit byte-identical, no staging folder left."""
    from hf_mrp.research import cli

    from helpers import boundary_process, file_hashes, staging_beside

    old = tmp_path / "old"
    assert (
        cli.main(
            [
                "audit",
                "--model",
                str(tiny_model_dir),
                "--output_dir",
                str(old),
                "--block_size",
                "32",
                "--max_positions",
                "62",
            ]
        )
        == 0
    )
    old_files = file_hashes(old)
    runs = {}
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        folder, marker = tmp_path / signum.name, tmp_path / f"{signum.name}.paused"
        shutil.copytree(old, folder)
        runs[signum] = (
            folder,
            marker,
            boundary_process(
                tmp_path,
                tiny_model_dir,
                folder,
                2,
                "--max_positions",
                "93",
                "--overwrite_output_dir",
                "true",
                marker=marker,
            ),
        )
    for signum, (folder, marker, process) in runs.items():
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
            time.sleep(0.1)
        assert marker.read_text() == "wrote positions.parquet" and staging_beside(folder)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 128 + signum, (signum, err[-2000:])
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1] == f"hf-mrp audit: {INTERRUPTED}"
        assert file_hashes(folder) == old_files and staging_beside(folder) == []
        assert not [p for p in folder.rglob(".*") if p.name != ".hf_mrp.lock"]


def test_signal_handlers_are_restored_and_a_second_signal_is_not_caught(monkeypatch, capsys):
    from hf_mrp.research import cli

    previous = signal.getsignal(signal.SIGTERM)
    seen = {}

    def command(name, argv):
        seen["handler"] = signal.getsignal(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives here

    monkeypatch.setattr(cli, "run_command", command)
    assert cli.main(["compare"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines() == [f"hf-mrp compare: {INTERRUPTED}"]
    assert seen["handler"] not in (previous, signal.SIG_DFL) and signal.getsignal(signal.SIGTERM) == previous


# ---------------------------------------------------------------- issue 22: no network fails in seconds


def _without_network(tmp_path: Path, *argv: str) -> tuple[int, str, float]:
    env = _env(
        HF_HUB_OFFLINE="0",
        HF_DATASETS_OFFLINE="0",
        HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        HF_HOME=str(tmp_path / "hf_home"),
        PYTHONPATH=str(ROOT),
    )
    env.pop("TRANSFORMERS_OFFLINE", None)
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "hf_mrp.research.cli", *argv], capture_output=True, text=True, env=env, timeout=120
    )
    return run.returncode, run.stderr, time.monotonic() - started


def test_a_hub_model_id_without_network_fails_in_seconds(tmp_path):
    code, err, seconds = _without_network(
        tmp_path, "audit", "--model", "some-org/some-model", "--output_dir", str(tmp_path / "out")
    )
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "hf-mrp audit: error: could not load model 'some-org/some-model': the Hub cannot be reached (http://127.0.0.1:"
    ), last
    assert "does not answer" in last and "not in the local cache" in last
    assert seconds < 10, seconds
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name != ".hf_mrp.lock"]


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason='needs lm-eval: pip install "hf_mrp[eval]"')
def test_downstream_without_network_fails_in_seconds(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(vocab=49152), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "adapter"
    )
    code, err, seconds = _without_network(
        tmp_path,
        "downstream",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(tmp_path / "adapter"),
        "--tasks",
        "arc_easy",
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "hf-mrp downstream: error: task 'arc_easy' needs its dataset 'allenai/ai2_arc' from the Hub (http://127.0.0.1:"
    ), last
    assert "does not answer" in last and "not in the local cache, but this machine cannot reach the Hub" in last
    assert seconds < 10, seconds
    assert not (tmp_path / "out" / "downstream.json").exists()


def test_sigterm_during_training_ends_the_run_like_ctrl_c(tiny_model_dir, tmp_path):
    """What schedulers and `kill` send: one line, exit code 143, the checkpoint on disk whole, no staging folder,
    nothing marked finished."""
    wrapper = tmp_path / "pause_after_checkpoint.py"
    wrapper.write_text(PAUSE_WRAPPER)
    marker, out = tmp_path / "paused", tmp_path / "run"
    process, log = _start_refine(
        tiny_model_dir, out, wrapper=wrapper, env=_env(PAUSE_AT_STEP="2", PAUSE_MARKER=str(marker))
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    text = Path(log.name).read_text()
    assert code == 128 + signal.SIGTERM and "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == f"hf-mrp refine: {INTERRUPTED}"
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert not (out / "training_log.json").exists()
    assert not [p for p in out.rglob(".*") if p.name != ".hf_mrp.lock"]
    assert not list(out.parent.glob(f".{out.name}.staging-*"))
