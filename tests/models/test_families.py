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
from helpers import FAMILIES, VOCAB, build, decided, head_bounds, naive_penalty, tiny_model_bounds

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
    # two float32 forwards (rows in batches of 2 against all 3: other kernels), each within the tiny decoder's bound
    # of the exact logits (+2 roundings of a transform): a margin or a log-probability moves by at most twice a
    # logit's error, so 2 x 2 x the bound of the largest logit
    atol = 4 * tiny_model_bounds(layers=2, positions=27, length=10)[0] * float(logits.abs().max())
    sure = decided((top.values[:, 0] - top.values[:, 1]).numpy(), atol / 2)  # a near tie may go either way
    assert sure.mean() > 0.9
    np.testing.assert_array_equal(positions["top1_id"][sure], top.indices[:, 0].numpy()[sure])
    np.testing.assert_allclose(positions["margin"], (top.values[:, 0] - top.values[:, 1]).numpy(), rtol=0, atol=atol)
    own_logprob = torch.log_softmax(logits, -1).gather(1, ids[:, 1:].reshape(-1, 1)).squeeze(1)
    np.testing.assert_allclose(positions["target_logprob"], own_logprob.numpy(), rtol=0, atol=atol)


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
    # the same body forward in one process; two float32 heads (hf_mrp's fused one and the model's), each within
    # head_bounds (d = 32 + 2 roundings of a transform, V = 97, 21 positions) of the exact CE (>= 1 here)
    assert loss.item() == pytest.approx(own.item(), rel=2 * head_bounds(32 + 2, VOCAB, 21)[0])


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
    # The float32 model against the float64 one, relative to the largest gradient entry of the model: a gradient
    # that cancels exactly (OPT's key bias: softmax ignores a shift of all scores) is a sum of terms that size.
    bound = tiny_model_bounds(layers=2, positions=21, length=12)[1]
    scale = max(p.grad.abs().max().item() for p in want.values() if p.grad is not None)
    checked = 0
    for name, parameter in model.named_parameters():
        if want[name].grad is None or parameter.grad is None:
            assert want[name].grad is None or not want[name].grad.any(), name
            continue
        torch.testing.assert_close(parameter.grad.double(), want[name].grad, rtol=bound, atol=bound * scale, msg=name)
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
