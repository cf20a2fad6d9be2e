"""MRPAuditCallback: files, TensorBoard scalars read back, cached baseline; sharded audits equal one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from conftest import tiny_llama

from hf_mrp.audit import load_audit
from hf_mrp.audit.compare import compare_audits
from hf_mrp.reporting.io import read_parquet
from hf_mrp.training import MRPConfig, MRPTrainer
from hf_mrp.training.callbacks import MRPAuditCallback

ROOT = Path(__file__).resolve().parents[1]


def train_blocks(seed=1):
    ids = np.random.default_rng(seed).integers(0, 97, size=(8, 16))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def read_scalars(logdir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in logdir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(event.value for event in accumulator.Scalars(tag))
    return scalars


def test_callback_audits_logs_to_tensorboard_and_reuses_its_baseline(blocks, tmp_path, monkeypatch):
    out, logdir = tmp_path / "run", tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    args = dict(output_dir=str(out), report_to="tensorboard", save_strategy="no",
                use_cpu=True, max_steps=4, logging_steps=2, per_device_train_batch_size=4, learning_rate=5e-2,
                eval_strategy="steps", eval_steps=2, disable_tqdm=True, seed=0)
    callback = MRPAuditCallback(blocks)
    trainer = MRPTrainer(model=tiny_llama(), args=MRPConfig(**args), train_dataset=train_blocks(),
                         eval_dataset=train_blocks(2), callbacks=[callback])
    trainer.train()
    for folder in ("audit_before", "audit_step_2", "comparison_step_2", "audit_after", "comparison"):
        assert (out / folder).is_dir(), folder
    final = json.loads((out / "comparison" / "flip_audit.json").read_text())
    expected = compare_audits(load_audit(out / "audit_before"), load_audit(out / "audit_after"))
    assert final["w2r"] == expected["w2r"] and final["net"] == expected["net"]
    assert final["median_margin_change"] == pytest.approx(expected["median_margin_change"])
    scalars = read_scalars(logdir)
    for tag in ("audit/w2r", "audit/r2w", "audit/net", "audit/median_margin_change", "audit/gap_alpha",
                "train/loss_ce", "train/loss_mrp", "train/mean_margin"):
        key = tag if tag in scalars else tag.replace("audit/", "train/audit/")
        assert key in scalars, (tag, sorted(scalars))
    w2r = scalars.get("audit/w2r") or scalars["train/audit/w2r"]
    assert len(w2r) == 3 and w2r[-1] == final["w2r"]  # two evaluations + train end
    assert (scalars.get("audit/median_margin_change") or scalars["train/audit/median_margin_change"])[-1] == \
        pytest.approx(final["median_margin_change"], rel=1e-6)

    before_mtime = (out / "audit_before" / "audit.json").stat().st_mtime_ns
    again = MRPAuditCallback(blocks)
    trainer = MRPTrainer(model=tiny_llama(), args=MRPConfig(**{**args, "report_to": "none", "eval_strategy": "no"}),
                         train_dataset=train_blocks(), callbacks=[again])
    trainer.train()
    assert (out / "audit_before" / "audit.json").stat().st_mtime_ns == before_mtime  # cached, not redone


def test_callback_refuses_a_foreign_baseline_and_needs_its_trainer(blocks, tmp_path):
    from transformers import Trainer

    callback = MRPAuditCallback(blocks)
    trainer = Trainer(model=tiny_llama(), args=MRPConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                                         max_steps=1, per_device_train_batch_size=4),
                      train_dataset=train_blocks(), callbacks=[callback])
    with pytest.raises(Exception, match="attach"):
        trainer.train()


def test_two_process_audit_equals_one_process(tmp_path):
    from transformers import AutoTokenizer

    from hf_mrp import models

    model_dir = tmp_path / "tiny"
    tiny_llama(vocab=49152, layers=2).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(models.embedded_model_dir()).save_pretrained(model_dir)
    args = ["audit", "--model", str(model_dir), "--block_size", "32", "--max_positions", "300", "--batch_size", "2",
            "--layers", "all"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "hf_mrp.cli", *args, "--output_dir", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29531", "-m", "hf_mrp.cli", *args, "--output_dir", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = read_parquet(tmp_path / "one" / "positions.parquet"), read_parquet(tmp_path / "two" / "positions.parquet")
    for column in a:
        np.testing.assert_array_equal(a[column], b[column], err_msg=column)
    summary = [json.loads((tmp_path / run / "audit.json").read_text()) for run in ("one", "two")]
    for s in summary:
        s["provenance"].pop("arguments")  # output_dir differs
    assert summary[0] == summary[1]
    assert (tmp_path / "one" / "layers.json").read_text() == (tmp_path / "two" / "layers.json").read_text()
