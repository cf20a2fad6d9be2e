"""Sharded output heads: FSDP2 on 2 gloo CPU processes, and DeepSpeed ZeRO-3's parameter life cycle
(W has numel 0 outside the head's own forward, gathered inside it), against unsharded runs. The real DeepSpeed
engine (ZeRO-3 and ZeRO-2, a trained head included): tests/training/test_deepspeed.py."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_mrp.audit.collect import collect_statistics
from hf_mrp.data import Blocks
from hf_mrp.training import MRPConfig, MRPTrainer

from helpers import VOCAB, launched, tiny_llama

pytestmark = pytest.mark.slow  # torchrun processes

HERE = Path(__file__).resolve().parent


def test_fsdp2_loss_gradients_and_audit_equal_the_unsharded_run(tmp_path):
    """fully_shard applied as Accelerate does (the Trainer will not enable FSDP on CPU); 'full' trains W too. Both
    modes in one launch (a torchrun start costs seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = launched([str(HERE / "fsdp_worker.py"), str(tmp_path), "lora,full"], processes=2, env=env)
    reports = re.findall(r"rank (\d) mode (\w+): .*?failures: (none|\[.*?\])", run.stdout)
    assert sorted(reports) == [(rank, mode, "none") for rank in "01" for mode in ("full", "lora")], run.stdout


def zero3_life_cycle(model: torch.nn.Module) -> None:
    """Emulate ZeRO-3 on the head: its weight is empty (numel 0, marked with ds_id) except inside its forward."""
    head = model.get_output_embeddings()
    stash = {"data": head.weight.data}
    head.weight.ds_id = 0
    head.weight.data = torch.empty(0)

    def gather(module, args):
        module.weight.data = stash["data"]

    def release(module, args, output):
        stash["data"] = module.weight.data
        module.weight.data = torch.empty(0)

    head.register_forward_pre_hook(gather)
    head.register_forward_hook(release)


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True, mrp_lambda=0.6, lora_r=4)
    return MRPConfig(**{**values, **overrides})


def test_zero3_life_cycle_loss_gradients_and_audit_equal_the_unsharded_run(tmp_path):
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(0, VOCAB, size=(2, 16)))
    blocks = Blocks(rng.integers(0, VOCAB, size=(3, 12)), 3 * 11, "random")
    runs = []
    for gathered_only_in_forward in (False, True):
        trainer = MRPTrainer(model=tiny_llama(), args=config(tmp_path))
        if gathered_only_in_forward:
            zero3_life_cycle(trainer.model)
            assert trainer.model.get_output_embeddings().weight.numel() == 0
        loss = trainer.compute_loss(trainer.model, {"input_ids": ids, "labels": ids.clone()})
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        positions, _ = collect_statistics(trainer.model, blocks, progress=False, layers=[1])
        runs.append((loss.item(), grads, positions))
    # the same computation (W swapped in for its forward only), same shapes, one process: equal to the bit
    assert runs[0][0] == runs[1][0]
    for name, grad in runs[0][1].items():
        assert torch.equal(runs[1][1][name], grad), name
    for key in ("margin", "top1_id", "entropy"):
        np.testing.assert_array_equal(runs[0][2][key], runs[1][2][key])


def test_unwrap_reads_the_model_inside_compile_and_data_parallel_wrappers():
    """The DeepSpeed engine: tests/training/test_deepspeed.py (the real one)."""
    from hf_mrp.training.loss import unwrap

    model = tiny_llama()
    for wrapped in (torch.compile(model), torch.nn.DataParallel(model), torch.nn.DataParallel(torch.compile(model))):
        assert unwrap(wrapped) is model
    assert unwrap(model) is model
