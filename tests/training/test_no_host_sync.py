"""A training step between two logging steps asks the device for almost no number (issue 27): the only call from
hf_mrp's code that reads a device value on the host (on a GPU each such read stalls the stream) is the indices of
the valid positions in `ops.fused.mrp_loss_sums` (one ``nonzero`` per micro-batch, still to be removed), with
MRPTrainer and MRPSFTTrainer, with and without an audit callback. The counter wraps the tensor methods that read
(helpers.counted_host_reads); nine such reads per micro-batch were counted before."""

from __future__ import annotations

import pytest
from transformers import TrainerCallback

from hf_mrp.data import Blocks
from hf_mrp.training import MRPTrainer
from hf_mrp.training.callbacks import MRPAuditCallback

from helpers import config, counted_host_reads, dataset, tiny_llama, tiny_tokenizer


class CountBetweenLogs(TrainerCallback):
    """Counts host reads during steps 2 and 3 of a run that logs at step 4 (step 1 may check its inputs once)."""

    def __init__(self):
        self.calls: list = []
        self._counting = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self._counting = counted_host_reads()
            self.calls = self._counting.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3 and self._counting is not None:
            self._counting.__exit__(None, None, None)
            self._counting = None


RUN = dict(max_steps=4, logging_steps=4, per_device_train_batch_size=2, mrp_lambda=0.5)
MICRO_BATCHES = 2  # steps 2 and 3 are counted


def only_the_valid_gather(calls: list, micro_batches: int) -> bool:
    """Every read is the indices of the valid positions in fused.py, once per micro-batch."""
    gathers = [call for call in calls if call[0] == "nonzero" and call[1].endswith("ops/fused.py")]
    return gathers == calls and len(calls) == micro_batches


@pytest.mark.parametrize("objective", ["fisher", "margin", "entropy"])
@pytest.mark.parametrize("audited", [False, True])
def test_mrp_trainer_steps_read_nothing_from_the_device(tmp_path, objective, audited):
    counter = CountBetweenLogs()
    callbacks: list = [counter]
    if audited:
        ids = dataset(2, 12, seed=3)["input_ids"]
        import numpy as np

        callbacks.append(MRPAuditCallback(Blocks(np.asarray(ids), 22, "audit")))
    args = config(tmp_path, mrp_objective=objective, gradient_accumulation_steps=2, **RUN)
    MRPTrainer(model=tiny_llama(), args=args, train_dataset=dataset(16), callbacks=callbacks).train()
    assert only_the_valid_gather(counter.calls, 2 * MICRO_BATCHES), counter.calls  # 2 micro-batches a step


def test_depth_steps_read_nothing_from_the_device(tmp_path):
    """`combined` (the target layers' states kept by hooks, through the logit lens; depth + proxy_gated, logged
    apart at logging steps): still only the valid positions' gather."""
    counter = CountBetweenLogs()
    args = config(
        tmp_path, mrp_objective="combined", mrp_target_layers="0,1", mrp_depth_lens="logit", **RUN
    )  # fmt: skip
    trainer = MRPTrainer(model=tiny_llama(), args=args, train_dataset=dataset(16), callbacks=[counter])
    trainer.train()
    assert only_the_valid_gather(counter.calls, MICRO_BATCHES), counter.calls
    logged = trainer.state.log_history[0]
    assert logged["loss_mrp_depth"] > 0 and logged["loss_mrp_final"] > 0
    assert logged["loss_mrp_depth"] + logged["loss_mrp_final"] == pytest.approx(logged["loss_mrp"], rel=1e-6)


def test_mrp_sft_trainer_steps_read_nothing_from_the_device(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset

    from hf_mrp.training.sft import MRPSFTConfig, MRPSFTTrainer

    counter = CountBetweenLogs()
    rows = dataset(16)
    data = Dataset.from_dict({"input_ids": rows["input_ids"]})  # already tokenized: SFT trains on every token
    args = MRPSFTConfig(
        output_dir=str(tmp_path / "sft"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        mrp_objective="fisher",
        **RUN,
    )
    trainer = MRPSFTTrainer(
        tiny_llama(), args=args, train_dataset=data, processing_class=tiny_tokenizer(), callbacks=[counter]
    )
    trainer.train()
    assert only_the_valid_gather(counter.calls, MICRO_BATCHES), counter.calls
