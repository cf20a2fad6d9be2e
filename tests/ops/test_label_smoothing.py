"""``label_smoothing_factor`` in the fused CE (closed form) against transformers' own LabelSmoother: the op against
float64 autograd, MRPTrainer against the plain Trainer (lambda 0: same losses over accumulated steps, same weights),
and MRPSFTTrainer against SFTTrainer."""

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import LabelSmoother

from hf_mrp.errors import MRPUserError
from hf_mrp.ops import MRPSettings, mrp_loss_sums
from hf_mrp.ops.transform import LogitTransform
from hf_mrp.training import MRPTrainer

from helpers import (
    batch,
    config,
    cpu_arguments,
    dataset,
    head_bounds,
    naive_penalty,
    relative_error,
    tiny_llama,
    tiny_model_bounds,
)

EPS = 0.1


def smoothed_reference(logits, targets, eps, items):
    """transformers' LabelSmoother, as the plain Trainer calls it on a causal LM's (already shifted) logits."""
    return LabelSmoother(epsilon=eps)({"logits": logits[None]}, targets[None], num_items_in_batch=items)


@pytest.mark.parametrize("objective, lam", [("fisher", 0.0), ("entropy", 0.4), ("margin", 0.7)])
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.5, softcap=5.0)])
def test_smoothed_ce_and_gradient_equal_float64_label_smoother(objective, lam, transform):
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(30, 8) * 2, torch.randn(41, 8), torch.randn(41) * 0.1
    targets = torch.randint(0, 41, (30,))
    targets[:4] = -100
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    sums = mrp_loss_sums(
        leaves[0],
        leaves[1],
        targets,
        MRPSettings(
            objective=objective, lam=lam, tau=1.5, top_k=3, chunk_size=7, normalization="valid", label_smoothing=EPS
        ),
        bias=leaves[2],
        transform=transform,
    )
    (sums.total / 26).backward()
    leaves64 = [t.double().clone().requires_grad_() for t in (hidden, weight, bias)]
    valid = targets != -100
    z = transform.apply(leaves64[0][valid] @ leaves64[1].T + leaves64[2])
    ce = smoothed_reference(z, targets[valid], EPS, 26)
    reference = ce + lam * naive_penalty(z, leaves64[1] * transform.scale, objective, 1.5, 3).sum() / 26
    reference.backward()
    # float32 head against float64: d = 8 (+2 roundings of the transform), V = 41, 26 positions, k = 3
    loss_bound, grad_bound = head_bounds(8 + 2, 41, 26, 3)
    assert float(sums.ce.detach()) / 26 == pytest.approx(float(ce.detach()), rel=loss_bound)
    assert float(sums.total.detach()) / 26 == pytest.approx(float(reference.detach()), rel=loss_bound)
    for got, want in zip(leaves, leaves64):
        torch.testing.assert_close(
            got.grad.double(), want.grad, rtol=grad_bound, atol=grad_bound * want.grad.abs().max()
        )


def test_compute_loss_gradient_equals_float64_trainer_label_smoother(tmp_path):
    model, reference_model = tiny_llama(), tiny_llama().double()
    inputs = batch()
    items = int(inputs["labels"][:, 1:].ne(-100).sum()) + 5  # as the count of a larger accumulated batch
    trainer = MRPTrainer(model=model, args=config(tmp_path, use_lora=False, mrp_lambda=0.0, label_smoothing_factor=EPS))
    loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=torch.tensor(items))
    loss.backward()
    logits = reference_model(input_ids=inputs["input_ids"]).logits
    expected = LabelSmoother(epsilon=EPS)(
        {"logits": logits}, inputs["labels"], shift_labels=True, num_items_in_batch=items
    )
    expected.backward()
    loss_bound, grad_bound = tiny_model_bounds()  # the whole float32 model against the float64 one
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=loss_bound)
    references = dict(reference_model.named_parameters())
    for name, parameter in model.named_parameters():
        want = references[name].grad
        torch.testing.assert_close(
            parameter.grad.double(), want, rtol=grad_bound, atol=grad_bound * want.abs().max(), msg=name
        )


@pytest.mark.slow  # two training runs
def test_mrp_trainer_at_lambda_zero_trains_as_the_plain_trainer_with_label_smoothing(tmp_path):
    """Same model copy and seed, 3 optimizer steps of 2 accumulated micro-batches each: the same logged losses (1e-6)
    and the same trained weights."""
    common = dict(
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        optim="sgd",
        label_smoothing_factor=EPS,
    )
    data = dataset(rows=12)
    plain = Trainer(
        model=tiny_llama(), args=TrainingArguments(**cpu_arguments(tmp_path / "plain", **common)), train_dataset=data
    )
    mrp = MRPTrainer(
        model=tiny_llama(), args=config(tmp_path, use_lora=False, mrp_lambda=0.0, **common), train_dataset=data
    )
    assert plain.label_smoother is not None
    for trainer in (plain, mrp):
        trainer.train()
    plain_losses, mrp_losses = ([row["loss"] for row in t.state.log_history if "loss" in row] for t in (plain, mrp))
    assert len(plain_losses) == 3
    # One process, the same body kernels: only the head differs (fused chunks against full logits and the
    # LabelSmoother), each within head_bounds (d = 32, V = 97, 2 x 11 positions) of the exact loss, so twice it
    # apart; SGD (lr 1e-2, gradients clipped to norm 1) moves the weights by lr x the gradients' difference, which
    # changes the next losses far less.
    loss_bound, grad_bound = (2 * bound for bound in head_bounds(32, 97, 22))
    np.testing.assert_allclose(mrp_losses, plain_losses, rtol=loss_bound)
    # lambda 0: the same CE, averaged by the Trainer (micro-batch means, summed) and by the mixin (sums divided once)
    assert [row["loss_ce"] for row in mrp.state.log_history if "loss" in row] == pytest.approx(
        mrp_losses, rel=loss_bound
    )
    unsmoothed = MRPTrainer(
        model=tiny_llama(),
        args=config(tmp_path, use_lora=False, mrp_lambda=0.0, **{**common, "label_smoothing_factor": 0.0}),
        train_dataset=data,
    )
    unsmoothed.train()
    assert abs(unsmoothed.state.log_history[0]["loss"] - mrp_losses[0]) > 1e-3  # smoothing changes the loss
    trained = dict(mrp.model.named_parameters())
    for name, parameter in plain.model.named_parameters():  # 3 steps of lr x (gradients within grad_bound, norm <= 1)
        torch.testing.assert_close(trained[name], parameter, rtol=0, atol=3 * 1e-2 * grad_bound, msg=name)


def test_label_smoothing_factor_out_of_range_is_refused(tmp_path):
    with pytest.raises(MRPUserError, match=r"label_smoothing_factor must be in \[0, 1\]"):
        config(tmp_path, label_smoothing_factor=1.5)


def test_mrp_sft_trainer_smooths_as_sft_trainer(tiny_model_dir, tmp_path):
    """The loss equals SFTTrainer's (its label smoother over full float32 logits); every gradient equals the float64
    LabelSmoother's, as SFTTrainer's own float32 autograd does, within the float32 bound of the model."""
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM

    from helpers import first_batch, loss_and_grads, setup, sft_pair

    tokenizer, model, data, common = setup(tiny_model_dir, tmp_path, "assistant_only")
    common["label_smoothing_factor"] = EPS
    with pytest.warns(FutureWarning, match="label_smoothing_factor"):  # TRL's own, for SFTConfig
        sft, mrp = sft_pair(model, tokenizer, data, common, tmp_path)
    batch_, items = first_batch(sft)
    sft_loss, sft_grads = loss_and_grads(sft, model, batch_, items)
    mrp_loss, mrp_grads = loss_and_grads(mrp, model, batch_, items)
    # the same body; two float32 heads over V = 49,152 (hidden 32; under 512 positions, rows under 128 tokens)
    torch.testing.assert_close(mrp_loss, sft_loss, rtol=2 * head_bounds(32, 49_152, 512)[0], atol=0)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double()
    logits = reference(**{key: value for key, value in batch_.items() if key != "labels"}).logits
    LabelSmoother(epsilon=EPS)(
        {"logits": logits}, batch_["labels"], shift_labels=True, num_items_in_batch=int(items)
    ).backward()
    references = dict(reference.named_parameters())
    assert sft_grads.keys() == mrp_grads.keys() and len(sft_grads) > 5
    grad_bound = tiny_model_bounds(vocab=49_152, positions=512, length=128)[1]  # float32 model against float64
    for name, grad in mrp_grads.items():
        want = references[name].grad
        assert relative_error(grad, want) <= grad_bound, name
        assert relative_error(sft_grads[name], want) <= grad_bound, name
