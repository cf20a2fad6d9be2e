"""MRPSFTTrainer against TRL's own SFTTrainer (lambda 0) and a float64 reference (lambda > 0)."""

import pytest
import torch

pytest.importorskip("trl")


from hf_mrp.errors import MRPUserError  # noqa: E402
from hf_mrp.training.callbacks import MRPAuditCallback  # noqa: E402
from hf_mrp.training.sft import MRPSFTConfig, MRPSFTTrainer  # noqa: E402

from helpers import (  # noqa: E402
    ANSWERS,
    MODES,
    assert_refuses_bad_checkpoints,
    chain_bound,
    decided,
    first_batch,
    head_bounds,
    loss_and_grads,
    naive_penalty,
    relative_error,
    setup,
    sft_pair,
)


@pytest.mark.parametrize("mode", list(MODES))
def test_lambda_zero_equals_sft_trainer(tiny_model_dir, tmp_path, mode):
    tokenizer, model, dataset, common = setup(tiny_model_dir, tmp_path, mode)
    sft, mrp = sft_pair(model, tokenizer, dataset, common, tmp_path)
    batch, items = first_batch(sft)
    batch_mrp, _ = first_batch(mrp)
    assert torch.equal(batch["input_ids"], batch_mrp["input_ids"]) and torch.equal(batch["labels"], batch_mrp["labels"])
    carrying = batch["labels"][:, 1:].ne(-100)
    assert 0 < int(items) < carrying.numel() // 2  # the mask leaves the prompts (and template tokens) out
    if mode == "packed_padding_free":
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch and "position_ids" in batch
    sft_loss, sft_grads = loss_and_grads(sft, model, batch, items)
    mrp_loss, mrp_grads = loss_and_grads(mrp, model, batch, items)
    # One process, the same body; two float32 heads over V = 49,152 (hidden 32, under 512 positions): the loss (>= 1)
    # within twice head_bounds, the gradients within twice the head's gradient bound of their largest entry (the
    # body's backward passes the head's difference on linearly)
    loss_bound, grad_bound = (2 * bound for bound in head_bounds(32, 49_152, 512))
    torch.testing.assert_close(mrp_loss, sft_loss, rtol=loss_bound, atol=0)
    assert sft_grads.keys() == mrp_grads.keys() and len(sft_grads) > 5
    for name, grad in sft_grads.items():
        assert relative_error(mrp_grads[name], grad) <= grad_bound, name
    metrics = mrp._metrics["train"], sft._metrics["train"]  # TRL's metrics, from the fused MRP pass
    assert metrics[0]["num_tokens"][-1] == metrics[1]["num_tokens"][-1]  # a count
    assert metrics[0]["entropy"][-1] == pytest.approx(metrics[1]["entropy"][-1], rel=loss_bound)  # entropies >= 1
    # top-1 accuracy: a position may count differently only where its top-2 logits are within the heads' errors
    accuracy_atol = undecided_share(model, batch, 2 * chain_bound(33)) + 1e-12
    assert metrics[0]["mean_token_accuracy"][-1] == pytest.approx(
        metrics[1]["mean_token_accuracy"][-1], abs=accuracy_atol
    )
    assert mrp.recorded_sums()["n"] == int(items)
    assert mrp.recorded_sums()["ce"] / int(items) == pytest.approx(float(sft_loss), rel=loss_bound)


@torch.no_grad()
def undecided_share(model, batch, relative: float) -> float:
    """The share of the loss positions whose top-1 logit is within ``relative`` x the largest logit of the
    runner-up (where two float32 heads may pick another top-1)."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1][batch["labels"][:, 1:].ne(-100)].double()
    top = logits.topk(2, -1).values
    return float((~decided((top[:, 0] - top[:, 1]).numpy(), relative * float(logits.abs().max()))).mean())


def float64_reference(model, batch, objective: str, tau: float, k: int):
    """CE and objective sums in float64 over exactly the positions whose shifted label is not -100."""
    captured = {}
    hook = model.model.norm.register_forward_hook(lambda module, args, output: captured.update(h=output))
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        model(**inputs, use_cache=False)
    hook.remove()
    targets = batch["labels"][:, 1:]
    carrying = targets.ne(-100)
    weight = model.lm_head.weight.detach().double()
    logits = captured["h"][:, :-1][carrying].double() @ weight.T
    ce = torch.nn.functional.cross_entropy(logits, targets[carrying], reduction="sum")
    penalty = naive_penalty(logits, weight, objective, tau, k).sum()
    return ce, penalty, int(carrying.sum()), float(logits.abs().max())


@pytest.mark.parametrize("objective", ["margin", "fisher"])
@pytest.mark.parametrize("mode", ["assistant_only", "packed_padding_free"])
def test_objective_equals_float64_reference_on_loss_positions(tiny_model_dir, tmp_path, objective, mode):
    tokenizer, model, dataset, common = setup(tiny_model_dir, tmp_path, mode)
    args = MRPSFTConfig(
        output_dir=str(tmp_path),
        mrp_lambda=0.7,
        mrp_objective=objective,
        mrp_top_k=4,
        mrp_margin_threshold=50.0,
        mrp_margin_normalization="valid",
        **common,
    )
    trainer = MRPSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch, items = first_batch(trainer)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
    ce, penalty, n, z_max = float64_reference(model, batch, objective, 50.0, 4)
    sums = trainer.recorded_sums()
    assert sums["n"] == n == int(items)
    assert abs(float(penalty)) > 1e-3  # the objective is active on these positions
    # the float32 head against float64 from the same hidden states: CE (positive terms) within head_bounds; each
    # position's objective is a function of its top-k logits, each within a dot's bound (33 terms) of z_max, with
    # Lipschitz constant <= 2k (margins: 2; Fisher's sum over k^2 pairs of p_i p_j d_ij: <= 2k), plus its own sums
    ce_bound = head_bounds(32, 49_152, n, 4)[0]
    objective_atol = n * 2 * 4 * chain_bound(33) * z_max + ce_bound * abs(float(penalty))
    assert sums["objective"] == pytest.approx(float(penalty), rel=0, abs=objective_atol)
    assert sums["ce"] == pytest.approx(float(ce), rel=ce_bound)
    want = float((ce + 0.7 * penalty) / n)
    assert float(loss.detach()) == pytest.approx(want, rel=ce_bound, abs=0.7 * objective_atol / n)


def test_training_logs_mrp_and_trl_metrics_and_audits(tiny_model_dir, tmp_path):
    import numpy as np

    from hf_mrp.data import Blocks

    tokenizer, model, dataset, common = setup(tiny_model_dir, tmp_path, "assistant_only")
    ids = np.asarray([tokenizer(a)["input_ids"][:5] for a in ANSWERS[:4]])
    audit = MRPAuditCallback(Blocks(ids, n_positions=ids.size - len(ids), source="answers"), tokenizer=tokenizer)
    common["gradient_checkpointing"] = True  # SFTConfig's default
    args = MRPSFTConfig(output_dir=str(tmp_path), mrp_lambda=0.5, mrp_objective="margin", max_steps=2, **common)
    trainer = MRPSFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[audit]
    )
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 2
    for key in ("loss_ce", "loss_mrp", "mean_margin", "entropy", "mean_token_accuracy", "num_tokens"):
        assert all(np.isfinite(row[key]) for row in logged), key
    assert logged[1]["num_tokens"] > logged[0]["num_tokens"] > 0
    assert (tmp_path / "comparison" / "flip_audit.json").is_file()
    assert any("audit/net" in row for row in trainer.state.log_history)


def test_refuses_what_the_fused_loss_cannot_honour(tiny_model_dir, tmp_path):
    with pytest.raises(MRPUserError, match="loss_type"):
        MRPSFTConfig(output_dir=str(tmp_path), loss_type="dft", use_cpu=True, bf16=False)
    with pytest.raises(MRPUserError, match="mrp_lambda"):
        MRPSFTConfig(output_dir=str(tmp_path), mrp_lambda=-1.0, use_cpu=True, bf16=False)


def test_resume_from_a_missing_or_incomplete_checkpoint_is_refused(tiny_model_dir, tmp_path):
    """The checkpoint checks live in the trainers' shared mixin: MRPSFTTrainer refuses what MRPTrainer refuses."""
    tokenizer, model, dataset, common = setup(tiny_model_dir, tmp_path, "assistant_only")
    trainer = MRPSFTTrainer(
        model=model,
        args=MRPSFTConfig(output_dir=str(tmp_path), max_steps=1, **common),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert_refuses_bad_checkpoints(trainer, tmp_path)
