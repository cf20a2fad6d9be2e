"""Divergence and collapse on the tiny model, in the fast tier: each failure is made to happen deterministically (a
callback writes a NaN or a zero into a weight right after an optimizer step), never hoped for through a learning
rate large enough on this machine's rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_mrp.training import MRPTrainer
from hf_mrp.training.divergence import MAX_ZERO_GRADIENT_STEPS, TrainingCollapsed, TrainingDiverged

from helpers import WriteAfterUpdate, config, dataset, nan_into_lora, tiny_llama, zero_final_norm


def _trainer(tmp_path: Path, callback=None, **overrides) -> MRPTrainer:
    run = dict(
        max_steps=6,
        per_device_train_batch_size=2,
        mrp_objective="margin",
        mrp_lambda=0.5,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=1,
    )
    args = config(tmp_path, **{**run, **overrides})
    return MRPTrainer(
        model=tiny_llama(), args=args, train_dataset=dataset(12), callbacks=[callback] if callback else []
    )


def _checkpoints(trainer) -> list[str]:
    return sorted(p.name for p in Path(trainer.args.output_dir).glob("checkpoint-*"))


def test_a_nan_written_by_the_second_update_stops_the_run_at_the_next_step(tmp_path):
    """Caught at the start of step 3 (not only after training): the run stops with global_step 2, the checkpoint of
    the NaN weights is removed and checkpoint-1 stays."""
    trainer = _trainer(tmp_path, WriteAfterUpdate(2, nan_into_lora))
    with pytest.raises(TrainingDiverged, match="training diverged at step 2: its update made the trainable weights"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert _checkpoints(trainer) == ["checkpoint-1"]


def test_a_collapsed_model_with_no_gradient_stops_the_run(tmp_path):
    """Zero gradients from step 3 on: after MAX_ZERO_GRADIENT_STEPS of them the run fails as collapsed, naming the
    update that killed it (2); checkpoint-2 on are removed (their weights give no gradient), checkpoint-1 stays."""
    trainer = _trainer(tmp_path, WriteAfterUpdate(2, zero_final_norm))
    last = 2 + MAX_ZERO_GRADIENT_STEPS
    with pytest.raises(TrainingCollapsed) as caught:
        trainer.train()
    message = str(caught.value)
    assert message.startswith(
        f"training collapsed at step 2: after its update the trainable weights got no gradient at all "
        f"(gradient norm exactly 0) in steps 3-{last}"
    ), message
    assert "lower --learning_rate" in message and "the last good checkpoint is" in message
    assert trainer.state.global_step == last
    assert _checkpoints(trainer) == ["checkpoint-1"]
    assert isinstance(caught.value, TrainingDiverged)  # handled everywhere as a diverged run


def test_gradients_that_vanish_for_fewer_steps_than_the_limit_do_not_stop_a_run(tmp_path):
    """The same collapse two steps before the end: MAX_ZERO_GRADIENT_STEPS - 1 zero-gradient steps are allowed (a
    plain MRPTrainer run has no audit to see the ties; the refine pipeline's after-audit does)."""
    steps = 2 + MAX_ZERO_GRADIENT_STEPS - 1
    trainer = _trainer(tmp_path, WriteAfterUpdate(2, zero_final_norm), max_steps=steps, save_strategy="no")
    trainer.train()
    assert trainer.state.global_step == steps
    assert int(trainer._zero_gradient_steps.item()) == MAX_ZERO_GRADIENT_STEPS - 1


def test_a_run_whose_updates_change_no_weight_trained_nothing(tmp_path):
    """Full fine-tuning at learning rate 1e-30: Adam's step (about the learning rate) is far below the float32
    spacing of every weight (>= 2^-24 x |w|, |w| ~ 1e-2 or more, so ~1e-9), so no weight changes, bit for bit."""
    trainer = _trainer(tmp_path, use_lora=False, learning_rate=1e-30, max_steps=2, save_strategy="no")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(
        TrainingCollapsed, match="training collapsed at step 2: its 2 updates changed no trainable"
    ) as e:
        trainer.train()
    for name, parameter in trainer.model.named_parameters():
        assert torch.equal(parameter, before[name]), name  # the premise: nothing moved
    assert "learning rate too small" in str(e.value) and "raise --learning_rate" in str(e.value)


def test_a_healthy_run_passes_every_check(tmp_path):
    trainer = _trainer(tmp_path, max_steps=3, save_strategy="no")
    trainer.train()
    assert trainer.state.global_step == 3 and int(trainer._zero_gradient_steps.item()) == 0
