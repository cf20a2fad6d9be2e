"""Float32 where hf_mrp says float32: the fused loss, the audit and the logit lens under CPU bf16 / fp16 autocast and
for bf16 weights equal the float32 computation from the same hidden states; a bf16 trained head trains; fp16 with a
grad scaler; the bf16-operand opt-in."""

import numpy as np
import pytest
import torch

from hf_mrp.audit.collect import _batch_statistics
from hf_mrp.audit.readers import LensReader
from hf_mrp.errors import MRPUserError
from hf_mrp.ops import MRPSettings, decision_statistics, mrp_loss_sums, precision
from hf_mrp.ops.transform import IDENTITY, LogitTransform
from hf_mrp.training import MRPConfig, MRPTrainer
from hf_mrp.training.loss import forward_with_mrp_loss

from helpers import BF16_U, batch, config, dataset, head_bounds, probable_gamma, relative_error, tiny_llama

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
TRANSFORMS = {"plain": LogitTransform(), "scale+softcap": LogitTransform(scale=0.5, softcap=6.0)}


def head_problem(seed=0, n=40, d=16, vocab=53):
    torch.manual_seed(seed)
    hidden = torch.randn(n, d) * 2
    weight, bias = torch.randn(vocab, d), torch.randn(vocab) * 0.1
    targets = torch.randint(0, vocab, (n,))
    targets[:5] = -100
    return hidden, weight, bias, targets


def loss_and_grads(hidden, weight, bias, targets, transform=IDENTITY, with_entropy=False, **settings):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    sums = mrp_loss_sums(
        leaves[0],
        leaves[1],
        targets,
        MRPSettings(chunk_size=7, normalization="valid", **settings),
        bias=leaves[2],
        transform=transform,
        with_entropy=with_entropy,
    )
    sums.total.backward()
    return sums, [leaf.grad for leaf in leaves]


def assert_relative(got, want, rtol):
    error = relative_error(got, want)
    assert error <= rtol, error


# Two float32 computations of head_problem's head on other blockings of the same operands (another tiling of W, a
# bf16 kernel's order): each within helpers.head_bounds (d = 16, V = 53, 40 positions) of the exact loss
HEAD_BOUND = 2 * head_bounds(16, 53, 40)[0]


def capture_input(captured: dict, key):
    """A forward pre-hook keeping its module's last input (returns None: the input is unchanged)."""

    def hook(module, args):
        captured[key] = args[0]

    return hook


def capture_output(captured: dict, key):
    def hook(module, args, output):
        captured[key] = output[0] if isinstance(output, tuple) else output

    return hook


@pytest.mark.parametrize("objective", ["margin", "fisher", "entropy"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_fused_loss_under_bf16_autocast_is_the_float32_computation(objective, transform):
    problem = head_problem()
    options = dict(
        objective=objective,
        lam=0.7,
        tau=1.5,
        top_k=4,
        transform=TRANSFORMS[transform],
        with_entropy=True,
        label_smoothing=0.1,
    )
    want, want_grads = loss_and_grads(*problem, **options)
    with torch.autocast(**BF16):
        got, got_grads = loss_and_grads(*problem, **options)
    # autocast is off inside the fused loss: the same float32 kernels on the same operands and shapes, in one
    # process, so equal to the bit (a bf16 op left under autocast would be ~BF16_U = 4e-3 away)
    for name in ("total", "ce", "objective", "margin", "entropy"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert (got.n_gated, got.n_correct) == (want.n_gated, want.n_correct)
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert got_grad.dtype == torch.float32
        assert torch.equal(got_grad, want_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("objective", ["margin", "fisher", "entropy"])
def test_low_precision_inputs_compute_in_float32_and_get_gradients_in_their_dtype(monkeypatch, dtype, objective):
    hidden, weight, bias, targets = (t.to(dtype) if t.is_floating_point() else t for t in head_problem(1))
    options = dict(objective=objective, lam=0.5, top_k=3, transform=TRANSFORMS["scale+softcap"])
    want, want_grads = loss_and_grads(hidden.float(), weight.float(), bias.float(), targets, **options)
    monkeypatch.setattr(precision, "TILE_ELEMENTS", 10 * 16)  # W in 6 tiles of 10 rows: no whole float32 copy
    with torch.autocast(device_type="cpu", dtype=dtype):
        got, got_grads = loss_and_grads(hidden, weight, bias, targets, **options)
    assert_relative(got.total, want.total, HEAD_BOUND)  # W in tiles of 10 rows: another blocking of the same sums
    assert_relative(got.ce, want.ce, HEAD_BOUND)
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert got_grad.dtype == dtype
        # the float32 gradient (HEAD_BOUND ~ 2.6e-5, below eps) rounded once to the input's dtype: u = eps / 2 of
        # each entry; eps relative and eps of the largest entry absolute (entries near 0) hold both with 2x margin
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got_grad.float(), want_grad, rtol=eps, atol=eps * want_grad.abs().max())


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_audit_statistics_under_autocast_and_for_bf16_weights_are_float32(transform):
    hidden, weight, bias, targets = head_problem(2)
    targets = targets.clamp_min(0)
    options = dict(bias=bias, chunk_size=9, top_k=4, tau=1.5, transform=TRANSFORMS[transform])
    want = decision_statistics(hidden, weight, targets, **options)
    with torch.autocast(**BF16):
        got = decision_statistics(hidden, weight, targets, **options)
    for name, values in want.items():  # autocast is off inside: the same float32 computation, equal to the bit
        assert torch.equal(got[name], values), name
    low = decision_statistics(hidden.bfloat16(), weight.bfloat16(), targets, **{**options, "bias": bias.bfloat16()})
    same = decision_statistics(
        hidden.bfloat16().float(), weight.bfloat16().float(), targets, **{**options, "bias": bias.bfloat16().float()}
    )
    for name, values in same.items():  # bf16 operands are upcast exactly (bf16 -> float32 is exact): equal to the bit
        assert low[name].dtype == values.dtype and torch.equal(low[name], values), name


def test_bf16_margin_dtype_still_shows_the_low_precision_artifact_under_autocast():
    hidden, weight, bias, targets = head_problem(3)
    targets = targets.clamp_min(0)
    with torch.autocast(**BF16):
        low = decision_statistics(hidden, weight, targets, margin_dtype=torch.bfloat16)
    top = (hidden.bfloat16() @ weight.bfloat16().T).topk(2, -1).values  # one chunk: the same bf16 matmul, same shape
    torch.testing.assert_close(low["margin"], (top[:, 0] - top[:, 1]).float(), rtol=0, atol=0)


def test_audit_and_lens_under_autocast_equal_float32_from_the_same_hidden_states():
    """One audit forward under bf16 autocast: its final-layer and lens statistics equal `decision_statistics`
    outside autocast on the hidden states that forward really produced (captured by hooks)."""
    model = tiny_llama()
    ids = batch()["input_ids"]
    mask = torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    mask[0, :4] = False
    targets = ids[:, 1:][mask]
    layers = [0, 1]
    captured = {}
    hooks = [model.lm_head.register_forward_pre_hook(capture_input(captured, "final"))]
    hooks += [model.model.layers[i].register_forward_hook(capture_output(captured, i)) for i in layers]
    reader = LensReader(layers)  # the audit's logit lens, fed by the same forward
    reader.begin_batch(0, int(mask.sum()))
    with torch.autocast(**BF16):
        final = _batch_statistics(model, ids, mask, targets, [reader], layers, torch.float32, chunk_size=16)
    reader.finish(lambda local: local, 1)
    for hook in hooks:
        hook.remove()
    weight = model.lm_head.weight
    want_final = decision_statistics(captured["final"][:, :-1][mask], weight, targets, chunk_size=16)
    # autocast is off inside the audit's head: the same float32 computation (the same norm, chunks of 16) on the
    # hidden states the forward produced, in one process: equal to the bit
    for name in ("margin", "target_logprob"):
        assert torch.equal(final[name], want_final[name]), name
    for layer in layers:
        want = decision_statistics(model.model.norm(captured[layer])[:, :-1][mask], weight, targets, chunk_size=16)
        for name in ("margin", "fisher_penalty", "margin_penalty"):
            assert np.array_equal(reader.columns[layer][name], want[name].numpy()), (layer, name)


def test_training_loss_under_autocast_is_float32_from_the_model_hidden_states():
    model = tiny_llama().train()
    inputs = batch()
    captured = {}
    model.lm_head.register_forward_pre_hook(capture_input(captured, "hidden"))
    settings = MRPSettings("fisher", 0.6, 1.0, 5, 8, "gated", 0.0, "float32")
    with torch.autocast(**BF16):
        sums, _ = forward_with_mrp_loss(model, {"input_ids": inputs["input_ids"]}, inputs["labels"], settings)
    want = mrp_loss_sums(
        captured["hidden"][:, :-1].detach(),
        model.lm_head.weight.detach(),
        inputs["labels"][:, 1:],
        MRPSettings(objective="fisher", lam=0.6, chunk_size=8),
    )
    # the same float32 head on the hidden states the model produced, chunked alike: equal to the bit
    for got, expected in ((sums.total.detach(), want.total), (sums.ce, want.ce), (sums.objective, want.objective)):
        assert torch.equal(got, expected)


def test_bf16_trained_head_trains(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    before = model.lm_head.weight.detach().clone()
    grad_dtypes = []
    model.lm_head.weight.register_hook(lambda grad: grad_dtypes.append(grad.dtype))
    args = config(
        tmp_path, use_lora=False, bf16=True, max_steps=3, learning_rate=5e-2, mrp_lambda=0.5, mrp_objective="fisher"
    )
    trainer = MRPTrainer(model=model, args=args, train_dataset=dataset())
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert grad_dtypes and set(grad_dtypes) == {torch.bfloat16}
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert not torch.equal(model.lm_head.weight.detach(), before)


def test_fp16_autocast_with_a_grad_scaler_hands_back_the_scaled_float32_gradients():
    """The grad scaler's contract on CPU (the Trainer's own fp16 path needs CUDA: accelerate autocasts fp16 only on
    accelerators): under fp16 autocast, loss scaled by 2**12, the gradient the fused loss hands to the hidden states
    is 2**12 times the float32 one from the same hidden states, the head's (unscaled) equals the float32 one, no
    gradient overflows and the scaler steps."""
    inputs = batch()
    settings = MRPSettings("margin", 0.6, 1.0, 5, 8, "valid", 0.0, "float32")
    model = tiny_llama().train()
    captured = {}

    def keep_hidden_and_its_gradient(module, args):
        captured["hidden"] = args[0]
        if args[0].requires_grad:  # not the logit-transform probe, which runs without gradients
            args[0].register_hook(lambda grad: captured.setdefault("hidden_grad", grad))

    model.lm_head.register_forward_pre_hook(keep_hidden_and_its_gradient)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with torch.autocast(device_type="cpu", dtype=torch.float16):
        sums, _ = forward_with_mrp_loss(model, {"input_ids": inputs["input_ids"]}, inputs["labels"], settings)
    scaler.scale(sums.total / sums.n_positions).backward()
    scaler.unscale_(optimizer)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    head_grad = model.lm_head.weight.grad.clone()
    weight_before = model.lm_head.weight.detach().clone()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**12  # no inf / NaN found: the step was taken
    hidden = captured["hidden"].detach().clone().requires_grad_()
    weight = weight_before.requires_grad_()
    reference = mrp_loss_sums(
        hidden[:, :-1],
        weight,
        inputs["labels"][:, 1:],
        MRPSettings(objective="margin", lam=0.6, chunk_size=8, normalization="valid"),
    )
    (reference.total / reference.n_positions).backward()
    # the same float32 head on the same hidden states and weight, its upstream gradient 2**12 times larger: a power
    # of two scales every product exactly (no overflow here), and unscale_ divides it out exactly: equal to the bit
    assert torch.equal(head_grad, weight.grad)
    assert torch.equal(captured["hidden_grad"] / 2.0**12, hidden.grad)


def test_bfloat16_operands_opt_in_is_bf16_rounding_with_float32_sums():
    hidden, weight, bias, targets = head_problem(4)
    options = dict(objective="fisher", lam=0.5, top_k=3)
    got, got_grads = loss_and_grads(hidden, weight, bias, targets, precision="bfloat16", **options)
    rounded = [t.bfloat16().float() for t in (hidden, weight)]
    want, _ = loss_and_grads(rounded[0], rounded[1], bias, targets, **options)
    exact, exact_grads = loss_and_grads(hidden, weight, bias, targets, **options)
    assert_relative(got.ce, want.ce, HEAD_BOUND)  # the logits of bf16-rounded operands, summed in float32
    assert relative_error(got.ce, exact.ce) > HEAD_BOUND  # and not the float32 ones (no reordering is this far)
    # each operand rounded once (BF16_U): a logit moves by at most dz = 2 BF16_U max sum_j |h_j w_ij| (+ bias);
    # the gradients, softmax probabilities (1-Lipschitz in the logits) times the operands, to first order by at
    # most that fraction of their scale
    dz = 2 * BF16_U * float((hidden.abs() @ weight.abs().T + bias.abs()).max())
    for got_grad, exact_grad in zip(got_grads, exact_grads):
        assert got_grad.dtype == torch.float32
        assert_relative(got_grad, exact_grad, dz)


def test_logits_precision_is_a_checked_config_field(tmp_path):
    assert MRPConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none").mrp_logits_precision == "float32"
    with pytest.raises(MRPUserError, match="mrp_logits_precision 'fp8'; choose one of float32, bfloat16"):
        MRPConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", mrp_logits_precision="fp8")
    args = MRPConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", mrp_logits_precision="bfloat16")
    assert args.mrp_settings.precision == "bfloat16"
    with pytest.raises(MRPUserError, match="unknown mrp_logits_precision 'fp8'"):
        MRPSettings(precision="fp8")


def test_mrp_sft_trainer_under_trl_default_bf16_logs_sft_trainer_float32_head_loss(tiny_model_dir, tmp_path):
    """TRL's default SFTConfig (bf16 autocast on, CPU): MRPSFTTrainer at lambda 0 logs the losses and entropy of
    SFTTrainer with TRL's own float32 head (``cast_lm_head_to_fp32``) to 1e-5, on the same model copy and seed.
    (SFTTrainer's default head computes its logits in the autocast dtype, bf16: about 1e-4 relative away.)"""
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.utils import add_fused_lm_head

    from hf_mrp.training.sft import CHATML_GENERATION_TEMPLATE, MRPSFTConfig, MRPSFTTrainer

    from helpers import chat_dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = CHATML_GENERATION_TEMPLATE
    data = chat_dataset("messages")
    logged = {}
    for name, trainer_class, config_class, extra in (
        ("sft", SFTTrainer, SFTConfig, {}),
        ("mrp", MRPSFTTrainer, MRPSFTConfig, {"mrp_lambda": 0.0}),
    ):
        args = config_class(
            output_dir=str(tmp_path / name),
            per_device_train_batch_size=3,
            max_steps=2,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            seed=0,
            **extra,
        )
        assert args.bf16  # TRL's default
        trainer = trainer_class(
            model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
        )
        if trainer_class is SFTTrainer:
            add_fused_lm_head(trainer.model, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy", "is_top1"))
        trainer.train()
        logged[name] = [(row["loss"], row["entropy"]) for row in trainer.state.log_history if "loss" in row]
    assert len(logged["sft"]) == 2
    # The same bf16 body (one process, same kernels); two float32 heads over V = 49,152: the chunked fused one and
    # TRL's. Per token log Z moves by <= probable_gamma(V) (a sum of positive terms: relative error of the sum,
    # absolute error of its log), z_y and the entropy's sum_i p_i z_i by <= probable_gamma(d) of sum_j |h_j w_ij|
    # (d = 32, |z| < 10 here: < 1e-5). Loss and entropy are >= 1 (log V = 10.8 at the start), so relative <=
    # absolute; 2x for the two heads. (Step 2 follows one AdamW step, lr 2e-5, whose size lr * m / (sqrt(v) + eps)
    # a relative gradient change of 1e-5 moves only where |g| ~ eps, by far less than this.)
    bound = 2 * (probable_gamma(49_152) + 10 * probable_gamma(32))
    np.testing.assert_allclose(logged["mrp"], logged["sft"], rtol=bound)
