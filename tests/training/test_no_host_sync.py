"""A training step between two logging steps asks the device for no number (issue 27): no call from hf_mrp's code
reads a device value on the host (on a GPU each such read stalls the stream), with MRPTrainer and MRPSFTTrainer,
with and without an audit callback. The counter wraps the tensor methods that read (helpers.counted_host_reads);
nine such reads per micro-batch were counted before, then one (the ``nonzero`` of the valid positions, gone since
the fused loss runs every position with ignored ones weighing 0)."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from hf_mrp.data import Blocks
from hf_mrp.ops import MRPSettings, mrp_loss_sums
from hf_mrp.training import MRPTrainer
from hf_mrp.training.callbacks import MRPAuditCallback

from helpers import config, counted_host_reads, dataset, tiny_llama, tiny_tokenizer


class CountBetweenLogs(TrainerCallback):
    """Counts host reads during steps 2 and 3 of a run that logs at step 4 (step 1 may check its inputs once)."""

    def __init__(self):
        self.calls: list = []
        self.counted_steps = 0
        self._counting = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self._counting = counted_host_reads()
            self.calls = self._counting.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self.counted_steps += self._counting is not None
        if state.global_step == 3 and self._counting is not None:
            self._counting.__exit__(None, None, None)
            self._counting = None


def test_the_counter_sees_a_read_from_hf_mrp_code():
    """The counter's positive control: the fused loss with its checks on (not the trainers' hot path) reads whether
    the objective's penalty is finite, one ``bool`` from ops/fused.py."""
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(6, 4), torch.randn(10, 4), torch.tensor([1, 2, -100, 3, 4, 5])
    with counted_host_reads() as calls:
        mrp_loss_sums(hidden, weight, targets, MRPSettings(objective="margin", lam=0.5), defer_checks=False)
        mrp_loss_sums(hidden, weight, targets, MRPSettings(objective="margin", lam=0.5), defer_checks=True)
    assert [(name, path.endswith("ops/fused.py")) for name, path, _ in calls] == [("__bool__", True)], calls


RUN = dict(max_steps=4, logging_steps=4, per_device_train_batch_size=2, mrp_lambda=0.5)
COUNTED_STEPS = 2  # steps 2 and 3


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
    assert counter.calls == [] and counter.counted_steps == COUNTED_STEPS, counter.calls


def test_depth_steps_read_nothing_from_the_device(tmp_path):
    """`combined` (the target layers' states kept by hooks, through the logit lens; depth + proxy_gated, logged
    apart at logging steps): nothing read either."""
    counter = CountBetweenLogs()
    args = config(
        tmp_path, mrp_objective="combined", mrp_target_layers="0,1", mrp_depth_lens="logit", **RUN
    )  # fmt: skip
    trainer = MRPTrainer(model=tiny_llama(), args=args, train_dataset=dataset(16), callbacks=[counter])
    trainer.train()
    assert counter.calls == [] and counter.counted_steps == COUNTED_STEPS, counter.calls
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
    assert counter.calls == [] and counter.counted_steps == COUNTED_STEPS, counter.calls
