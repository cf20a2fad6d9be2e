"""Drop-in conformance over decoder families: the audit and the loss see the logits each model emits
(soft cap, scaling included), the loss equals the model's own at lambda 0, gradients equal float64
autograd through the model's own logits, and a default LoRA run trains."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from hf_mrp.audit.collect import collect_statistics
from hf_mrp.data import Blocks
from hf_mrp.training import MRPConfig, MRPTrainer

import helpers
from helpers import FAMILIES, VOCAB, build, naive_penalty

pytestmark = pytest.mark.filterwarnings("ignore")


def token_ids(rows=2, length=12, seed=0):
    return torch.as_tensor(np.random.default_rng(seed).integers(3, VOCAB, size=(rows, length)))


def config(tmp_path, **overrides) -> MRPConfig:
    return helpers.config(tmp_path, **{"per_device_train_batch_size": 2, "use_lora": False, **overrides})


@pytest.mark.parametrize("family", FAMILIES)
def test_audit_margins_are_those_of_the_models_own_float32_logits(family):
    model = build(family)
    ids = token_ids(3, 10)
    positions, _ = collect_statistics(model, Blocks(ids.numpy(), 3 * 9, "random"), batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()[:, :-1].reshape(-1, VOCAB)
    top = logits.topk(2, dim=-1)
    np.testing.assert_array_equal(positions["top1_id"], top.indices[:, 0].numpy())
    np.testing.assert_allclose(positions["margin"], (top.values[:, 0] - top.values[:, 1]).numpy(), rtol=1e-4, atol=1e-4)
    own_logprob = torch.log_softmax(logits, -1).gather(1, ids[:, 1:].reshape(-1, 1)).squeeze(1)
    np.testing.assert_allclose(positions["target_logprob"], own_logprob.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_at_lambda_zero_is_the_models_own_loss(tmp_path, family):
    """Router auxiliary loss included for MoE models with output_router_logits (Mixtral here)."""
    model = build(family)
    ids = token_ids()
    labels = ids.clone()
    labels[0, :4] = -100
    trainer = MRPTrainer(model=model, args=config(tmp_path, mrp_lambda=0.0))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, {"input_ids": ids, "labels": labels})
        own = model(input_ids=ids, labels=labels).loss
    assert loss.item() == pytest.approx(own.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_float64_autograd_through_the_models_own_logits(tmp_path, family):
    model, reference = build(family), build(family, dtype=torch.float64)
    ids = token_ids()
    labels = ids.clone()
    labels[1, :3] = -100
    trainer = MRPTrainer(model=model, args=config(tmp_path, mrp_objective="fisher", mrp_lambda=0.5, mrp_top_k=3))
    trainer.compute_loss(trainer.model, {"input_ids": ids, "labels": labels}).backward()
    outputs = reference(input_ids=ids)
    targets = labels[:, 1:].reshape(-1)
    valid = targets != -100
    z = outputs.logits[:, :-1].reshape(-1, VOCAB)[valid].double()  # Mamba casts its logits to float32
    head = reference.get_output_embeddings().weight
    expected = (
        F.cross_entropy(z, targets[valid], reduction="sum") + 0.5 * naive_penalty(z, head, "fisher", 1.0, 3).sum()
    ) / valid.sum()
    if getattr(outputs, "aux_loss", None) is not None:
        expected = expected + reference.config.router_aux_loss_coef * outputs.aux_loss
    expected.backward()
    want = dict(reference.named_parameters())
    checked = 0
    for name, parameter in model.named_parameters():
        if want[name].grad is None or parameter.grad is None:
            assert want[name].grad is None or not want[name].grad.any(), name
            continue
        scale = want[name].grad.abs().max().item()
        torch.testing.assert_close(
            parameter.grad.double(), want[name].grad, rtol=1e-3, atol=1e-5 + 1e-3 * scale, msg=name
        )
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("family", FAMILIES)
def test_default_lora_fisher_run_trains(tmp_path, family):
    model = build(family)
    ids = token_ids(4, 12).tolist()
    trainer = MRPTrainer(
        model=model,
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        args=config(tmp_path, use_lora=True, max_steps=2, learning_rate=1e-2),
    )
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in name for name in adapters)
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if n in adapters and not torch.equal(p, adapters[n])]
    assert changed
    assert all(np.isfinite(row["loss"]) for row in trainer.state.log_history if "loss" in row)


def test_all_linear_covers_conv1d_and_respects_peft_exclusions():
    from hf_mrp.training.adapters import decoder_linear_names

    assert decoder_linear_names(build("gpt2")) == ["c_attn", "c_fc", "c_proj"]  # transformers' Conv1D
    assert decoder_linear_names(build("mamba")) == ["dt_proj", "in_proj", "x_proj"]  # PEFT refuses out_proj
    assert "lm_head" not in decoder_linear_names(build("llama"))
