"""Packed (padding-free) batches: DataCollatorWithFlattening's position_ids go through, and no position
predicts across a document boundary, so a packed batch equals its documents run one by one."""

import numpy as np
import pytest
import torch
from transformers import DataCollatorWithFlattening

from hf_mrp.training import MRPConfig, MRPTrainer

from helpers import VOCAB, relative_error, tiny_llama, tiny_model_bounds


@pytest.mark.parametrize("objective, flash_kwargs", [("fisher", False), ("entropy", False), ("fisher", True)])
def test_packed_batch_equals_the_sum_over_its_documents(tmp_path, objective, flash_kwargs):
    """With the collator's flash-attention kwargs (cu_seq_lens_*, max_length_*) too: they go through."""
    rng = np.random.default_rng(0)
    documents = [rng.integers(3, VOCAB, size=n).tolist() for n in (7, 11, 5)]
    args = MRPConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        use_lora=False,
        mrp_objective=objective,
        mrp_lambda=0.7,
        mrp_margin_normalization="valid",
        disable_tqdm=True,
    )
    model = tiny_llama()
    trainer = MRPTrainer(model=model, args=args)
    collator = DataCollatorWithFlattening(return_position_ids=True, return_flash_attn_kwargs=flash_kwargs)
    packed = collator([{"input_ids": d, "labels": d} for d in documents])
    assert packed["input_ids"].shape == (1, 23) and "position_ids" in packed
    assert ("cu_seq_lens_q" in packed) == flash_kwargs
    packed_sum = trainer.compute_loss(trainer.model, dict(packed), num_items_in_batch=1)
    packed_sum.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    separate_sum = 0.0
    for document in documents:
        ids = torch.tensor([document])
        loss = trainer.compute_loss(trainer.model, {"input_ids": ids, "labels": ids.clone()}, num_items_in_batch=1)
        loss.backward()
        separate_sum += loss.item()
    # one packed row of 23 against the documents one at a time: other kernels, each within the tiny decoder's bound
    loss_bound, grad_bound = (2 * bound for bound in tiny_model_bounds(positions=23, length=23))
    assert packed_sum.item() == pytest.approx(separate_sum, rel=loss_bound)
    for name, parameter in model.named_parameters():
        assert relative_error(packed_grads[name], parameter.grad) <= grad_bound, name
