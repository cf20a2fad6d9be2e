"""The console of a run with MRPAuditCallback: the audit as a table at train begin and end (one line at each
evaluation), the Trainer's progress bar / printer without the audit/* scalars, while log_history (and so every
reporter) still gets each one."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest
from datasets import Dataset
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from hf_mrp.audit import load_audit
from hf_mrp.audit.compare import compare_audits, decoder_from_tokenizer
from hf_mrp.data import Blocks
from hf_mrp.stats.calibration import expected_calibration_error
from hf_mrp.stats.token_classes import CLASSES
from hf_mrp.training import MRPConfig, MRPTrainer
from hf_mrp.training.callbacks import MRPAuditCallback
from hf_mrp.training.console import (
    AuditQuietPrinterCallback,
    AuditQuietProgressCallback,
    audit_table,
    class_codes,
    hide_audit_from_console,
    without_audit,
)

from helpers import CharTokenizer, tiny_llama


def _train(tmp_path, blocks, disable_tqdm: bool, console: bool = True) -> tuple[MRPTrainer, MRPAuditCallback, str]:
    """Train 4 steps (an evaluation at step 2) with the audit; returns what stdout and stderr received too."""
    ids = np.random.default_rng(1).integers(0, 97, size=(8, 16))
    train = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    audit = MRPAuditCallback(blocks, tokenizer=CharTokenizer(), console=console)
    args = MRPConfig(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        max_steps=4,
        logging_steps=1,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        eval_strategy="steps",
        eval_steps=2,
        disable_tqdm=disable_tqdm,
        seed=0,
    )
    trainer = MRPTrainer(
        model=tiny_llama(), args=args, train_dataset=train, eval_dataset=train.select(range(2)), callbacks=[audit]
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        trainer.train()
    return trainer, audit, printed.getvalue()


@pytest.fixture(scope="module", params=[False, True], ids=["progress_bar", "printer"])
def run(request, tmp_path_factory):
    """One run per console (tqdm's progress bar, or the printer of --disable_tqdm), shared by the tests below."""
    ids = np.random.default_rng(0).integers(0, 97, size=(5, 24), dtype=np.int64)  # conftest's ``blocks``
    tmp_path = tmp_path_factory.mktemp("console")
    return (tmp_path, *_train(tmp_path, Blocks(ids, n_positions=5 * 23 - 7, source="random"), request.param))


def _row(lines: list[str], title_start: str, label: str) -> list[str]:
    """The cells of row ``label`` in the table whose title starts with ``title_start``."""
    start = next(i for i, line in enumerate(lines) if line.startswith(title_start))
    row = next(line for line in lines[start + 2 :] if line.split()[0] == label)
    return row.replace(" -> ", "->").split()


def test_console_shows_tables_not_the_audit_scalars_and_the_logs_keep_every_scalar(run):
    tmp_path, trainer, audit, text = run
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)  # tqdm's cursor moves
    lines = [part for line in text.splitlines() for part in line.split("\r")]
    assert "audit/" not in text  # no scalar of the audit reaches the console ...
    logged = {key for row in trainer.state.log_history for key in row}
    assert {"audit/w2r", "audit/ece", "audit/class/content/net", "audit/bucket/100+/r2w"} <= logged  # ... all logs
    assert "'loss_ce'" in text and "'train_runtime'" in text  # the training logs still show
    assert max(len(line) for line in lines) < 400

    out = tmp_path / "run"
    before, after = load_audit(out / "audit_before"), load_audit(out / "audit_after")
    final = compare_audits(before, after, audit.decode)
    start = _row(lines, "audit before training", "all")
    assert start == [
        "all",
        str(before.summary.n_positions),
        "-",
        "-",
        "-",
        f"{before.summary.accuracy:.4f}",
        f"{before.summary.median_margin:.3f}",
        f"{before.summary.ece:.4f}",
    ]
    end = _row(lines, "audit after training (step 4)", "all")
    assert end == [
        "all",
        str(after.summary.n_positions),
        str(final["w2r"]),
        str(final["r2w"]),
        str(final["net"]),
        f"{before.summary.accuracy:.4f}->{after.summary.accuracy:.4f}",
        f"{before.summary.median_margin:.3f}->{after.summary.median_margin:.3f}",
        f"{before.summary.ece:.4f}->{after.summary.ece:.4f}",
    ]
    for label, group in final["by_class"].items():  # the class rows are the flip audit's, classes with positions
        if group["n"]:
            assert _row(lines, "audit after training", label)[1:5] == [
                str(group[key]) for key in ("n", "w2r", "r2w", "net")
            ]
    assert any(line.startswith("audit at step 2: W->R ") for line in lines)  # the evaluation's one line


@pytest.mark.parametrize("console", [True, False])
def test_attaching_swaps_the_trainers_console_unless_console_is_false(blocks, tmp_path, console):
    args = MRPConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1, disable_tqdm=True)
    ids = np.zeros((2, 8), dtype=np.int64).tolist()
    trainer = MRPTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        callbacks=[MRPAuditCallback(blocks, console=console)],
    )
    printers = [type(c) for c in trainer.callback_handler.callbacks if isinstance(c, PrinterCallback)]
    assert printers == [AuditQuietPrinterCallback if console else PrinterCallback]


def test_only_the_trainers_own_console_callbacks_are_swapped_and_keep_their_settings():
    class Mine(ProgressCallback):
        pass

    progress, printer, mine = ProgressCallback(max_str_len=7), PrinterCallback(), Mine()
    callbacks = [progress, printer, mine]
    hide_audit_from_console(callbacks)
    assert [type(c) for c in callbacks] == [AuditQuietProgressCallback, AuditQuietPrinterCallback, Mine]
    assert callbacks[0].max_str_len == 7 and isinstance(callbacks[0], ProgressCallback)
    assert without_audit({"audit/w2r": 1.0, "epoch": 1.0}) is None  # an audit's own log: nothing to print
    assert without_audit({"audit/w2r": 1.0, "loss": 2.0, "epoch": 1.0}) == {"loss": 2.0, "epoch": 1.0}


def test_the_table_rows_count_each_class_from_the_positions(run):
    """Every row from the per-position columns, against a direct count: the class rows add up to the all row."""
    out = run[0] / "run"
    before, after = load_audit(out / "audit_before"), load_audit(out / "audit_after")
    decode = decoder_from_tokenizer(CharTokenizer())
    comparison = compare_audits(before, after, decode)
    codes = class_codes(before, decode)
    lines = audit_table("t", after, codes, before, comparison).splitlines()
    rows = {line.split()[0]: line.replace(" -> ", "->").split() for line in lines[2:]}
    correct_before, correct_after = (np.asarray(a.positions["correct"]).astype(bool) for a in (before, after))
    totals = np.zeros(4, dtype=np.int64)
    for code, label in enumerate(CLASSES):
        mask = codes == code
        if not mask.any():
            assert label not in rows
            continue
        w2r = int((~correct_before[mask] & correct_after[mask]).sum())
        r2w = int((correct_before[mask] & ~correct_after[mask]).sum())
        counts = np.array([mask.sum(), w2r, r2w, w2r - r2w])
        assert [int(cell) for cell in rows[label][1:5]] == counts.tolist(), label
        ece = expected_calibration_error(np.asarray(after.positions["p_top1"])[mask], correct_after[mask])
        assert rows[label][7].endswith(f"->{ece:.4f}"), label
        totals += counts
    assert [int(cell) for cell in rows["all"][1:5]] == totals.tolist()
