"""EWC as a protection term: its Fisher against an independent float64 computation, the term and its gradient
against the formula, its log, and the set-ups it refuses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from hf_mrp.errors import MRPUserError
from hf_mrp.training import MRPTrainer
from hf_mrp.training.ewc import check_ewc_applies, estimate_penalty

from helpers import batch, config, tiny_llama

ROWS = 2


def _same_rows(rows: int = 6) -> Dataset:
    """Every row the same: every batch is the same batch, so the Fisher of any batches is that batch's g^2."""
    one = {key: value[:1].repeat(rows, 1).tolist() for key, value in batch(1, 12).items()}
    return Dataset.from_dict(one)


def _trainer(tmp_path, **overrides) -> MRPTrainer:
    run = dict(mrp_ewc_lambda=50.0, mrp_ewc_batches=3, per_device_train_batch_size=ROWS, max_steps=2, lora_dropout=0.0)
    return MRPTrainer(model=tiny_llama(), args=config(tmp_path, **{**run, **overrides}), train_dataset=_same_rows())


def test_the_fisher_is_the_squared_mean_cross_entropy_gradient(tmp_path):
    trainer = _trainer(tmp_path)
    model = trainer.model
    reference = copy.deepcopy(model).double().eval()  # independent: the model's own full logits, float64
    rows = {key: torch.as_tensor(value) for key, value in _same_rows()[:ROWS].items()}
    logits = reference(input_ids=rows["input_ids"]).logits[:, :-1]
    targets = rows["labels"][:, 1:]
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100).backward()
    expected = [p.grad.abs() for p in reference.parameters() if p.requires_grad]
    penalty = estimate_penalty(trainer, model)
    assert len(penalty.fisher) == len(expected) and all(p.grad is None for p in model.parameters())
    scale = max(float(g.max()) for g in expected)
    for fisher, gradient in zip(penalty.fisher, expected):
        # |g| in float32: a sum over <= 22 positions x 97 logits through 3 blocks; float32 rounding of such sums is
        # <= n * 2^-24 ~ 1.3e-4 of the largest gradient entry (n ~ 2,134): atol 2e-4 x the largest |g|
        torch.testing.assert_close(fisher.sqrt().double(), gradient, rtol=0, atol=2e-4 * scale)
    assert any(float(f.max()) > 0 for f in penalty.fisher)


def test_the_term_and_its_gradient_are_the_formula(tmp_path):
    trainer = _trainer(tmp_path)
    penalty = estimate_penalty(trainer, trainer.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in penalty.parameters:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-2)
    term = penalty()
    term.backward()
    exact = sum(
        (f.double() * (p.detach().double() - a.double()).square()).sum()
        for p, a, f in zip(penalty.parameters, penalty.anchor, penalty.fisher)
    )
    # a float32 sum of the trained entries' terms (n ~ 3e4, all >= 0): relative error <= n * 2^-24 ~ 2e-3
    assert float(term.detach()) == pytest.approx(0.5 * 50.0 * float(exact), rel=2e-3)
    for p, a, f in zip(penalty.parameters, penalty.anchor, penalty.fisher):
        torch.testing.assert_close(p.grad, 50.0 * f * (p.detach() - a), rtol=1e-5, atol=1e-12)  # one product each


def test_a_run_logs_loss_ewc_and_the_term_pulls_towards_the_start(tmp_path):
    runs = {}
    for lam in (0.0, 1e6):
        trainer = _trainer(tmp_path / str(lam), mrp_ewc_lambda=lam, max_steps=4, learning_rate=5e-2)
        start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        logged = [row for row in trainer.state.log_history if "loss" in row]
        assert all(("loss_ewc" in row) == (lam > 0) for row in logged)
        runs[lam] = sum(
            float((p.detach() - start[n]).square().sum())
            for n, p in trainer.model.named_parameters()
            if p.requires_grad
        )
        if lam:
            assert logged[0]["loss_ewc"] == 0.0 and logged[-1]["loss_ewc"] > 0.0  # theta = theta* at the first step
    assert runs[1e6] < runs[0.0]


def test_what_ewc_cannot_do_is_refused_in_one_line(tmp_path):
    with pytest.raises(MRPUserError, match="mrp_ewc_lambda must be a finite number >= 0"):
        config(tmp_path, mrp_ewc_lambda=-1.0)
    with pytest.raises(MRPUserError, match="mrp_ewc_batches >= 1"):
        config(tmp_path, mrp_ewc_lambda=1.0, mrp_ewc_batches=0)
    trainer = _trainer(tmp_path)
    with pytest.raises(MRPUserError, match="a resumed run cannot restore the EWC anchor"):
        check_ewc_applies(trainer, "checkpoint-2")

    class Sharded:
        args, is_fsdp_enabled, is_deepspeed_enabled = trainer.args, True, False

    with pytest.raises(MRPUserError, match="FSDP and DeepSpeed shard them"):
        check_ewc_applies(Sharded(), None)


def test_the_fisher_batches_record_nothing(tmp_path):
    """The Fisher batches are neither training nor evaluation batches: no logged sums or metrics (both trainers),
    while an evaluation forward afterwards does record (the flag is back on)."""
    from hf_mrp.training.sft import MRPSFTConfig, MRPSFTTrainer

    from helpers import cpu_arguments, tiny_tokenizer

    trainer = _trainer(tmp_path)
    estimate_penalty(trainer, trainer.model)
    assert trainer._mrp_sums == {"train": None, "eval": None} and trainer._penalty_faults is None
    args = MRPSFTConfig(**cpu_arguments(tmp_path / "sft", mrp_ewc_lambda=1.0, per_device_train_batch_size=ROWS))
    sft = MRPSFTTrainer(tiny_llama(), args=args, train_dataset=_same_rows(), processing_class=tiny_tokenizer())
    estimate_penalty(sft, sft.model)
    assert sft._mrp_sums == {"train": None, "eval": None} and not getattr(sft, "_train_tokens", 0)
    assert not any(values for metrics in sft._metrics.values() for values in metrics.values())
    sft.model.eval()
    sft.compute_loss(sft.model, sft._prepare_inputs(next(iter(sft.get_train_dataloader()))))
    assert sft._mrp_sums["eval"] is not None and sft._metrics["eval"]["entropy"]
