"""The released ``depth`` and ``combined`` objectives (docs/spec.md, "Refinement objectives") against float64
full-logits references written here from their definitions, through the model's own forward: the target layers'
outputs kept by hooks, projected by each lens (raw, logit, tuned), their loss and gradients with respect to the
final and target layers' hidden states and W, on Llama (no transform), Gemma 2 (soft cap 5) and Cohere (logit
scale 0.3); and the refusals of their settings."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from hf_mrp.audit.tuned_lens import FORMAT, load_tuned_lens, save_lens
from hf_mrp.errors import MRPUserError
from hf_mrp.models import logit_transform
from hf_mrp.ops import MRPSettings, mrp_loss_sums
from hf_mrp.ops.lens import AffineTranslators
from hf_mrp.training.depth import check_depth
from hf_mrp.training.loss import forward_with_mrp_loss

from helpers import batch, build

FAMILIES = ["llama", "gemma2", "cohere"]
LAYERS, TARGETS = 4, (0, 2)  # decoder blocks 0..3; 3 is the final one
LAM, K = 0.7, 4
# The product computes the head in float32 from the float64 model's states (2^-24 relative per logit of d = 32
# products); as in tests/ops/test_objectives.py the loss (~30 positions x 97 tokens, |loss| ~200) and the head's
# gradients stay within 1e-5 relative + 1e-5 absolute of float64. The float64 backward through <= 3 blocks below
# the head is the same linear map of those gradients on both sides (its Jacobian entries are O(1) on these tiny
# random models), so the hidden states' gradients keep that bound (measured: at most 0.6 of it, layer 0's).
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@functools.cache
def model_of(family: str):
    return build(family, dtype=torch.float64, num_hidden_layers=LAYERS)


def emitted(config, raw: torch.Tensor) -> torch.Tensor:
    """The logits the family emits from its head's output (Cohere scales, Gemma 2 soft-caps)."""
    scale = getattr(config, "logit_scale", None)
    z = raw * scale if scale is not None else raw
    cap = getattr(config, "final_logit_softcapping", None)
    return cap * torch.tanh(z / cap) if cap is not None else z


def proxy(z: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """The released compute_mrp_penalty per position: sum_{i != j} p_i p_j (1 - cos(w_i, w_j)) on the top-k
    (as released: topk of the full logits, softmax of the k, F.normalize'd rows of W, the diagonal masked)."""
    top, ids = z.topk(k, -1)
    p = torch.softmax(top, -1)
    unit = F.normalize(weight[ids], dim=-1)
    distance = 1.0 - unit @ unit.transpose(-1, -2)
    return (p[:, :, None] * p[:, None, :] * distance * (1.0 - torch.eye(k, dtype=z.dtype))).sum((-1, -2))


def keep_outputs(model, layers):
    """Hooks that keep (and retain the gradients of) the outputs of ``layers``: the tensors both sides differentiate."""
    kept = {}

    def hook(index):
        def keep(module, args, output):
            state = output[0] if isinstance(output, tuple) else output
            if state.requires_grad:  # not the logit transform's no-grad probe forward
                state.retain_grad()
                kept[index] = state

        return keep

    blocks = model.model.layers
    return kept, [blocks[i].register_forward_hook(hook(i)) for i in layers]


def tau_of(family: str) -> float:
    """A threshold in the widest gap of the middle half of the final layer's margins: the gate admits some positions
    and refuses others, none within rounding of tau."""
    model, inputs = model_of(family), batch()
    with torch.no_grad():
        z = model(input_ids=inputs["input_ids"]).logits[:, :-1][inputs["labels"][:, 1:] != -100]
    margins = (lambda top: top[:, 0] - top[:, 1])(z.topk(2, -1).values).sort().values
    middle = margins[len(margins) // 4 : 3 * len(margins) // 4 + 1]
    widest = int((middle[1:] - middle[:-1]).argmax())
    return float((middle[widest] + middle[widest + 1]) / 2)


def lens_folder(tmp_path, seed: int = 1):
    """A tuned lens of layers 0 and 2 (width 32) as `hf-mrp lens train` writes one, with random translators."""
    translators = AffineTranslators(list(TARGETS), 32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight, bias in zip(translators.weights, translators.biases):
            weight.copy_(0.2 * torch.randn(weight.shape, generator=generator))
            bias.copy_(0.2 * torch.randn(bias.shape, generator=generator))
    optimizer = torch.optim.Adam(translators.parameters())
    config = {"format": FORMAT, "layers": list(TARGETS), "hidden_size": 32, "step": 0}
    save_lens(tmp_path, translators, optimizer, config, writer=True)
    return tmp_path


def reference_loss(model, kept, labels, objective, lens, tau, lens_path):
    """CE + LAM * (proxy_gated at the final layer, for combined) + LAM * the mean over the target layers of the
    mean over valid positions of the proxy of that layer's logits, in float64 from the kept outputs."""
    weight, norm, config = model.get_output_embeddings().weight, model.model.norm, model.config
    targets, valid = labels[:, 1:], labels[:, 1:] != -100
    z = emitted(config, norm(kept[LAYERS - 1])[:, :-1][valid] @ weight.T)
    loss = F.cross_entropy(z, targets[valid], reduction="sum")
    if objective == "combined":
        top = z.topk(2, -1).values
        gate = top[:, 0] - top[:, 1] < tau
        loss = loss + LAM * proxy(z, weight, K)[gate].sum() * valid.sum() / gate.sum()
    translators = load_tuned_lens(lens_path).translators.double() if lens == "tuned" else None
    depth = []
    for layer in TARGETS:
        u = kept[layer]
        if translators is not None:
            u = u + u @ translators.weights[translators.index(layer)].T + translators.biases[translators.index(layer)]
        u = norm(u) if lens != "raw" else u
        depth.append(proxy(emitted(config, u[:, :-1][valid] @ weight.T), weight, K).sum())
    return loss + LAM * torch.stack(depth).mean()


def run(family, objective, lens, lens_path=None, product=True):
    """(loss, d/d final block output, d/d target layers' outputs, d/dW) of the product or of the reference."""
    model, inputs = model_of(family), batch()
    tau = tau_of(family)
    model.zero_grad()
    kept, handles = keep_outputs(model, (*TARGETS, LAYERS - 1))
    settings = MRPSettings(
        objective=objective,
        lam=LAM,
        tau=tau,
        top_k=K,
        chunk_size=7,
        depth_objective="proxy",
        target_layers=",".join(map(str, TARGETS)),
        depth_lens=lens,
        depth_lens_path=None if lens_path is None else str(lens_path),
    )
    try:
        if product:
            loss = forward_with_mrp_loss(model, {"input_ids": inputs["input_ids"]}, inputs["labels"], settings)[0].total
        else:
            model(input_ids=inputs["input_ids"])
            loss = reference_loss(model, kept, inputs["labels"], objective, lens, tau, lens_path)
    finally:
        for handle in handles:
            handle.remove()
    loss.backward()
    weight = model.get_output_embeddings().weight
    return [loss.detach().double(), kept[LAYERS - 1].grad, *(kept[i].grad for i in TARGETS), weight.grad.clone()]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "objective, lens", [("depth", "raw"), ("depth", "logit"), ("depth", "tuned"), ("combined", "logit")]
)
def test_depth_and_combined_equal_their_float64_references(family, objective, lens, tmp_path):
    path = lens_folder(tmp_path) if lens == "tuned" else None
    got = run(family, objective, lens, path, product=True)
    want = run(family, objective, lens, path, product=False)
    names = ["loss", "d/dh final", *(f"d/dh layer {i}" for i in TARGETS), "d/dW"]
    for name, g, w in zip(names, got, want):
        assert w.abs().max() > 1e-4, name  # a real loss and gradient, not 0 = 0
        torch.testing.assert_close(g, w, **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")


def test_depth_under_bf16_autocast_is_the_float32_computation():
    """bf16 autocast changes nothing in the fused loss (autocast off, float32 logits at every layer): the same float32
    operations in the same order, so equal up to float32 rounding of the loss' sums (1e-6)."""
    model, inputs = model_of("gemma2"), batch()
    with torch.no_grad():
        states = model(input_ids=inputs["input_ids"], output_hidden_states=True).hidden_states
    settings = MRPSettings(objective="depth", lam=LAM, top_k=K, chunk_size=5, target_layers="0,2")
    weight, targets = model.get_output_embeddings().weight.detach().float(), inputs["labels"][:, 1:]
    results = []
    for autocast in (False, True):
        leaves = [states[-1][:, :-1].float(), *(states[i + 1][:, :-1].float() for i in TARGETS), weight.clone()]
        for leaf in leaves:
            leaf.requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            sums = mrp_loss_sums(
                leaves[0], leaves[-1], targets, settings, transform=logit_transform(model), depth_states=leaves[1:-1]
            )
        sums.total.backward()
        results.append([sums.total, sums.depth, *(leaf.grad for leaf in leaves)])
    assert results[0][1] > 0 and results[0][3].abs().max() > 1e-4  # a real depth term and gradient
    for plain, autocast in zip(*results):
        assert autocast.dtype == torch.float32
        torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-6)


def refusal(model, **settings) -> str:
    with pytest.raises(MRPUserError) as error:
        check_depth(model, MRPSettings(objective="depth", **settings))
    line = str(error.value)
    assert "\n" not in line
    return line


def test_bad_depth_settings_are_refused_in_one_line_naming_the_setting(tmp_path):
    model = model_of("llama")
    line = refusal(model, target_layers="0,3")
    assert "mrp_target_layers '0,3'" in line and "choose layers in 0..2" in line
    line = refusal(model, target_layers="1", depth_lens="tuned", depth_lens_path=str(tmp_path / "none"))
    assert line.startswith(f"mrp_depth_lens_path {tmp_path / 'none'}") and "hf-mrp lens train" in line
    folder = lens_folder(tmp_path / "lens")  # translates layers 0 and 2
    line = refusal(model, target_layers="1,2", depth_lens="tuned", depth_lens_path=str(folder))
    assert "translates layers [0, 2]" in line and "hf-mrp lens train --layers 1,2" in line
    check_depth(
        model, MRPSettings(objective="depth", target_layers="0,2", depth_lens="tuned", depth_lens_path=str(folder))
    )
    with pytest.raises(MRPUserError, match="mrp_depth_objective 'entropy' does not read top-k logits"):
        MRPSettings(objective="combined", depth_objective="entropy")
    # only decoder layer 2 trains (LoRA on the top layers): target layers 0 and 1 would train nothing
    model.requires_grad_(False)
    model.model.layers[2].requires_grad_(True)
    line = refusal(model, target_layers="0,1")
    assert "lie below every trained parameter (the lowest trained decoder layer is 2)" in line
    assert "lora_layers '0-3'" in line  # this model's decoder layers are 0..3
    model.model.layers[1].self_attn.q_proj.requires_grad_(True)  # one trained weight at or below a target layer
    check_depth(model, MRPSettings(objective="depth", target_layers="0,1"))
    model.model.layers[1].requires_grad_(False)
    model.model.embed_tokens.requires_grad_(True)  # outside the blocks, below every layer: the term reaches it
    check_depth(model, MRPSettings(objective="combined", target_layers="0"))


def test_refine_takes_the_depth_flags_and_refuses_layers_the_model_lacks(tmp_path):
    """`hf-mrp refine` / examples/refine.py (one parser): the flags of docs/objectives.md reach MRPConfig's settings;
    a target layer beyond the embedded SmolLM2's (30 layers) is refused before anything loads."""
    from hf_mrp.research.commands.refine import parse_arguments

    flags = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"]
    depth = ["--mrp_objective", "depth", "--mrp_target_layers", "12,14,16", "--mrp_depth_lens", "logit"]
    settings = parse_arguments([*flags, *depth])[3].mrp_settings
    assert settings.record.layers and settings.layer_indices == (12, 14, 16) and settings.depth_lens == "logit"
    with pytest.raises(MRPUserError, match=r"mrp_target_layers '12,29'.*choose layers in 0\.\.28$"):
        parse_arguments([*flags, *depth[:3], "12,29"])
