"""MRPTrainer / MRPConfig on tiny models: loss values, gradients, accumulation, LoRA, QLoRA, errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_mrp.training import MRPTrainer

from helpers import batch, config, dataset, head_bounds, naive_penalty, tiny_llama, tiny_model_bounds


def reference_loss(model, inputs, objective, lam, tau=1.0, k=5, normalization="gated"):
    """CE + lambda * objective in float64 through the whole model, as plain autograd. The paper's margin
    objective ('gated') is a mean over the positions whose margin is below tau."""
    hidden = model.model(input_ids=inputs["input_ids"]).last_hidden_state[:, :-1]
    targets = inputs["labels"][:, 1:]
    valid = targets != -100
    z = hidden[valid] @ model.lm_head.weight.T
    ce = F.cross_entropy(z, targets[valid], reduction="sum")
    penalty = naive_penalty(z, model.lm_head.weight, objective, tau, k)
    if objective == "margin" and normalization == "gated":
        top = z.topk(2, -1).values
        return ce / valid.sum() + lam * penalty.sum() / (top[:, 0] - top[:, 1] < tau).sum()
    return (ce + lam * penalty.sum()) / valid.sum()


@pytest.mark.parametrize(
    "objective, normalization", [("margin", "gated"), ("margin", "valid"), ("fisher", "gated"), ("entropy", "gated")]
)
def test_compute_loss_and_gradient_match_float64_reference(tmp_path, objective, normalization):
    model = tiny_llama()
    reference_model = tiny_llama().double()
    inputs = batch()
    losses = []
    for chunk in (5, 1000):
        model.zero_grad()
        trainer = MRPTrainer(
            model=model,
            args=config(
                tmp_path,
                use_lora=False,
                mrp_objective=objective,
                mrp_lambda=0.7,
                mrp_chunk_size=chunk,
                mrp_margin_normalization=normalization,
            ),
        )
        loss = trainer.compute_loss(trainer.model, dict(inputs))
        loss.backward()
        losses.append(loss.item())
    expected = reference_loss(reference_model, inputs, objective, 0.7, normalization=normalization)
    expected.backward()
    loss_bound, grad_bound = tiny_model_bounds()  # the float32 model against the float64 one (4 x 11 positions)
    assert losses[0] == pytest.approx(expected.item(), rel=loss_bound)
    # chunks of 5 against one of 1000: the same body, the head's sums blocked otherwise (k = 5)
    assert losses[1] == pytest.approx(losses[0], rel=2 * head_bounds(32, 97, 44, 5)[0])
    for name in ("model.layers.0.mlp.down_proj.weight", "lm_head.weight", "model.embed_tokens.weight"):
        got = dict(model.named_parameters())[name].grad  # of the last pass (zeroed before each)
        want = dict(reference_model.named_parameters())[name].grad
        torch.testing.assert_close(got.double(), want, rtol=grad_bound, atol=grad_bound * want.abs().max(), msg=name)


@pytest.mark.parametrize("objective", ["margin", "fisher"])
def test_gradient_accumulation_invariance(tmp_path, objective):
    """Exact with the 'valid' normalization (the paper's 'gated' mean is per micro-batch, by definition)."""
    norms = []
    for per_device, accumulation in ((4, 1), (1, 4)):
        args = config(
            tmp_path,
            mrp_objective=objective,
            mrp_lambda=0.8,
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation,
            use_lora=False,
            mrp_margin_normalization="valid",
        )
        trainer = MRPTrainer(model=tiny_llama(), train_dataset=dataset(), args=args)
        trainer.train()
        norms.append(trainer.state.log_history[0]["grad_norm"])
    # the same sums grouped otherwise (a batch of 4 against 4 of 1: other kernels): each gradient within the tiny
    # decoder's bound of the exact one, and so their norm
    assert norms[0] == pytest.approx(norms[1], rel=2 * tiny_model_bounds()[1])


def test_lora_on_chosen_layers_only_and_reload(tmp_path):
    from peft import PeftModel

    model = tiny_llama()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = MRPTrainer(
        model=model, train_dataset=dataset(8), args=config(tmp_path, lora_layers="1-2", max_steps=3, learning_rate=1e-2)
    )
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and (".layers.1." in name or ".layers.2." in name) for name in trainable)
    trainer.train()
    peft_model = trainer.model
    merged_state = peft_model.get_base_model().state_dict()
    for key, value in base_before.items():  # the base stays bit-identical
        assert torch.equal(
            merged_state[key.replace(".weight", ".base_layer.weight")]
            if key not in merged_state
            else merged_state[key],
            value,
        ), key
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapter learned something
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    ids = batch()["input_ids"]
    peft_model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, peft_model(input_ids=ids).logits)


def test_mrp_weights_column_survives_remove_unused_columns(tmp_path):
    logged = {}
    for name, weights in (("zero", [[0.0] * 12] * 4), ("one", [[1.0] * 12] * 4)):
        trainer = MRPTrainer(
            model=tiny_llama(),
            train_dataset=dataset(weights=weights),
            args=config(tmp_path, remove_unused_columns=True, mrp_objective="entropy"),
        )
        trainer.train()
        logged[name] = trainer.state.log_history[0]["loss_mrp"]
    assert logged["zero"] == 0.0 and logged["one"] > 0.1


def test_gradient_checkpointing_with_lora(tmp_path):
    trainer = MRPTrainer(
        model=tiny_llama(),
        train_dataset=dataset(),
        args=config(tmp_path, gradient_checkpointing=True, learning_rate=1e-2),
    )
    trainer.train()
    assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)


def test_qlora_4bit_trains_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from hf_mrp.models import four_bit_config

    tiny_llama().save_pretrained(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "tiny", quantization_config=four_bit_config(torch.float32), device_map="cpu"
    )
    assert model.is_loaded_in_4bit
    trainer = MRPTrainer(model=model, train_dataset=dataset(8), args=config(tmp_path, max_steps=2, learning_rate=1e-2))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)


def test_pickled_config_never_holds_the_hub_token(tmp_path):
    """The Trainer's own push (_push_from_checkpoint) torch.saves args: MRPConfig pickles without tokens,
    while copies (the Trainer and Accelerate copy arguments) keep them."""
    import copy
    import io as bytes_io
    import pickle

    args = config(tmp_path, hub_token="hf_SECRETTOKEN123")
    buffer = bytes_io.BytesIO()
    torch.save(args, buffer)
    assert b"hf_SECRETTOKEN123" not in buffer.getvalue()
    restored = pickle.loads(pickle.dumps(args))
    assert restored.hub_token is None and restored.mrp_lambda == args.mrp_lambda
    assert copy.copy(args).hub_token == copy.deepcopy(args).hub_token == "hf_SECRETTOKEN123"


def reached_parameters(output: torch.Tensor) -> set[int]:
    """ids of the leaves the autograd graph of ``output`` reaches: what DDP's find_unused_parameters walks from the
    model's outputs at the end of each forward (a trained parameter it misses is marked ready twice)."""
    seen, found, stack = set(), set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            found.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


@pytest.mark.parametrize("objective", ["fisher", "entropy"])
def test_model_output_reaches_every_trained_parameter(tmp_path, objective):
    """The head returns zeros, the loss is computed inside it: its outputs must still reach the head's weight (and
    every other trained parameter), as DDP's find_unused_parameters needs (the whole model trained, --use_lora false
    under torchrun, failed with 'lm_head.weight marked as ready twice')."""
    args = config(tmp_path, use_lora=False, mrp_objective=objective, mrp_lambda=0.5)
    trainer = MRPTrainer(model=tiny_llama(), train_dataset=dataset(), args=args)
    seen = []  # the model's outputs in a training step's loss, as DDP's forward returns them
    hook = trainer.model.register_forward_hook(lambda module, inputs, outputs: seen.append(outputs))
    loss = trainer.compute_loss(trainer.model, batch())
    hook.remove()
    logits = seen[0].logits
    assert torch.count_nonzero(logits) == 0  # the head's zeros: no [positions x vocab] logits
    trained = {id(p): name for name, p in trainer.model.named_parameters() if p.requires_grad}
    missing = sorted(name for key, name in trained.items() if key not in reached_parameters(logits))
    assert missing == []
    loss.backward()
    assert all(p.grad is not None for p in trainer.model.parameters() if p.requires_grad)
