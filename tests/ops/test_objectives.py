"""Every registered objective (the built-ins, the released code's variants, a user's) against a float64 reference
written here from its definition (docs/spec.md), through the fused loss on the head of three tiny model families:
Llama (no transform), Gemma 2 (soft cap 5) and Cohere (logit scale 0.3)."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

from hf_mrp import TopK, register_objective
from hf_mrp.models import logit_transform
from hf_mrp.ops import MRPSettings, mrp_loss_sums
from hf_mrp.ops.objectives import registry

from helpers import batch, build, naive_penalty

FAMILIES = ["llama", "gemma2", "cohere"]
LAM, K = 0.7, 4
# Tolerance of the float32 fused loss against float64: the logits are d=32 dot products rounded to float32 (2^-24
# relative); the loss sums ~30 positions x 97 tokens (|loss| ~150) and each entry of W's gradient ~30 positions, so
# the error stays within 1e-5 relative + 1e-5 absolute (measured on these cases: at most 0.45 of that allowance,
# for W's gradient; 0.1 for the loss, 0.02 for the hidden states' gradient).
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def restore_registry(monkeypatch):
    """User objectives registered by a test vanish after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


@functools.cache
def head_problem(family: str):
    """A tiny model, its final hidden states (what its head reads), its head W and the shifted targets.

    The hidden states are scaled so that the raw logits have standard deviation 2: the soft cap (5) then does not
    saturate into exact ties, whose top-k order float32 and float64 would break differently. Every third valid
    target is the model's own top-1 token, so that correct positions exist (a random model has few)."""
    model = build(family)
    inputs = batch()
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=inputs["input_ids"])
    hook.remove()
    hidden, weight = seen[0][:, :-1].detach(), model.get_output_embeddings().weight.detach()
    hidden = hidden * (2.0 / (hidden @ weight.T).std())
    targets = inputs["labels"][:, 1:].clone()
    top1 = (hidden @ weight.T).argmax(-1)
    chosen = (targets != -100) & (torch.arange(targets.numel()).reshape(targets.shape) % 3 == 0)
    targets[chosen] = top1[chosen]
    return model, hidden, weight, targets


@functools.cache
def tau_of(family: str) -> float:
    """A threshold in the widest gap between the middle half of the family's sorted margins: every gate admits some
    positions and refuses others, and no margin sits within float32 rounding of tau."""
    model, hidden, weight, targets = head_problem(family)
    top = emitted(model.config, hidden[targets != -100].double() @ weight.double().T).topk(2, -1).values
    margins = (top[:, 0] - top[:, 1]).sort().values
    quarter = len(margins) // 4
    middle = margins[quarter : 3 * quarter + 1]
    widest = int((middle[1:] - middle[:-1]).argmax())
    return float((middle[widest] + middle[widest + 1]) / 2)


def emitted(config, raw: torch.Tensor) -> torch.Tensor:
    """The logits the family emits from its head's output, from its config (Cohere scales, Gemma 2 soft-caps)."""
    scale = getattr(config, "logit_scale", None)
    z = raw * scale if scale is not None else raw
    cap = getattr(config, "final_logit_softcapping", None)
    return cap * torch.tanh(z / cap) if cap is not None else z


def proxy_reference(z: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """The released 'final' (src/mrp/training.py, compute_mrp_penalty): sum_{i != j} p_i p_j (1 - cos(w_i, w_j))."""
    values = []
    for t in range(z.shape[0]):
        top, ids = z[t].topk(k)
        p = torch.softmax(top, -1)
        total = z.new_zeros(())
        for i, j in itertools.permutations(range(k), 2):
            cos = weight[ids[i]] @ weight[ids[j]] / (weight[ids[i]].norm() * weight[ids[j]].norm())
            total = total + p[i] * p[j] * (1 - cos)
        values.append(total)
    return torch.stack(values)


def reference(objective: str, z, weight, targets, tau: float, k: int):
    """(per-position penalty, gate or None) of each objective, from its definition, in float64."""
    top = z.topk(2, -1).values
    margin = top[:, 0] - top[:, 1]
    below = margin < tau
    if objective in ("margin", "fisher", "entropy"):
        gate = below if objective == "margin" else None
        return naive_penalty(z, weight, objective, tau, k), gate
    if objective == "correct_margin":
        correct = z.argmax(-1) == targets
        return torch.where(correct & below, -margin, torch.zeros_like(margin)), correct & below
    if objective == "proxy":
        return proxy_reference(z, weight, k), None
    if objective == "proxy_gated":
        return torch.where(below, proxy_reference(z, weight, k), torch.zeros_like(margin)), below
    raise AssertionError(objective)


def reference_total(config, hidden, weight, targets, objective, normalization, ce_weight, tau, weights=None):
    valid = targets != -100
    z = emitted(config, hidden[valid] @ weight.T)
    ce = F.cross_entropy(z, targets[valid], reduction="sum")
    penalty, gate = reference(objective, z, weight, targets[valid], tau, K)
    if weights is not None:
        penalty = penalty * weights[valid]
    factor = 1.0
    if gate is not None and normalization == "gated":
        factor = valid.sum() / gate.sum() if gate.sum() > 0 else 0.0
    return ce_weight * ce + LAM * factor * penalty.sum()


CASES = [
    ("margin", "gated", 1.0),
    ("margin", "valid", 1.0),
    ("fisher", "gated", 1.0),
    ("entropy", "gated", 1.0),
    ("correct_margin", "gated", 1.0),
    ("correct_margin", "valid", 0.0),
    ("proxy", "gated", 1.0),
    ("proxy", "gated", 0.0),
    ("proxy_gated", "gated", 1.0),
    ("proxy_gated", "valid", 0.5),
]


def fused_and_reference(family, objective, normalization, ce_weight, chunk_size=7, weights=None):
    model, hidden, weight, targets = head_problem(family)
    settings = MRPSettings(
        objective=objective,
        lam=LAM,
        tau=tau_of(family),
        top_k=K,
        chunk_size=chunk_size,
        normalization=normalization,
        ce_weight=ce_weight,
    )
    h32, w32 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    sums = mrp_loss_sums(h32, w32, targets, settings, transform=logit_transform(model), position_weights=weights)
    sums.total.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = reference_total(
        model.config, h64, w64, targets, objective, normalization, ce_weight, tau_of(family), weights
    )
    want.backward()
    return (sums.total, h32.grad, w32.grad), (want, h64.grad, w64.grad)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("objective, normalization, ce_weight", CASES)
def test_every_builtin_objective_equals_its_float64_reference(family, objective, normalization, ce_weight):
    """Loss and gradients w.r.t. the hidden states and W, chunked (7 positions), through the family's transform."""
    got, want = fused_and_reference(family, objective, normalization, ce_weight)
    assert want[0] != 0 and want[1].abs().max() > 1e-4  # a real loss and gradient, not 0 = 0
    for name, g, w in zip(("loss", "d/dh", "d/dW"), got, want):
        torch.testing.assert_close(g.double(), w.detach(), **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_gated_variants_gate_some_positions_and_not_others(family):
    """The reference cases above are not vacuous: each gate admits some positions, not all."""
    model, hidden, weight, targets = head_problem(family)
    valid = targets != -100
    z = emitted(model.config, hidden[valid].double() @ weight.double().T)
    for objective in ("margin", "correct_margin", "proxy_gated"):
        _, gate = reference(objective, z, weight.double(), targets[valid], tau_of(family), K)
        assert 0 < int(gate.sum()) < gate.numel(), objective


@pytest.mark.parametrize("family", FAMILIES)
def test_objective_weights_apply_to_a_registered_objective(family, restore_registry):
    """mrp_weights (per-position objective weights) scale the penalty, never the CE."""
    weights = torch.linspace(0.0, 2.0, 11).repeat(4, 1)
    got, want = fused_and_reference(family, "proxy_gated", "gated", 1.0, weights=weights)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.detach(), **TOLERANCE)


def test_correct_margin_under_bf16_autocast_is_the_float32_computation():
    """bf16 autocast changes nothing: the fused loss runs with autocast off, float32 logits."""
    model, hidden, weight, targets = head_problem("gemma2")
    settings = MRPSettings(objective="correct_margin", lam=LAM, tau=tau_of("gemma2"), chunk_size=5)
    results = []
    for autocast in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            sums = mrp_loss_sums(h, w, targets, settings, transform=logit_transform(model))
        sums.total.backward()
        results.append((sums.total, h.grad, w.grad))
    for plain, autocast in zip(*results):
        assert autocast.dtype == torch.float32
        # the same float32 operations in the same order: equal up to float32 rounding of the loss' sums
        torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-6)
    _, want = fused_and_reference("gemma2", "correct_margin", "gated", 1.0, chunk_size=5)
    for got_value, want_value in zip(results[1], want):
        torch.testing.assert_close(got_value.double(), want_value.detach(), **TOLERANCE)


def hinge(top: TopK) -> torch.Tensor:
    """The issue's example, as a user writes it."""
    margin = top.values[:, 0] - top.values[:, 1]
    return torch.relu(top.tau - margin)


def target_gap(top: TopK) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated, reads the target's logit: how far the target trails the top-1 logit, where it trails by less than
    4 tau (registered with rows=True it is handed rows it does not use: they get no gradient)."""
    gap = top.values[:, 0] - top.target_logit
    return gap, (gap < 4 * top.tau) & ~top.correct


def full_entropy(top: TopK) -> torch.Tensor:
    assert top.logits is not None
    return -(torch.softmax(top.logits, -1) * torch.log_softmax(top.logits, -1)).sum(-1)


USER_REFERENCES = {
    "hinge": lambda z, targets, tau: (
        torch.relu(tau - (z.topk(2, -1).values[:, 0] - z.topk(2, -1).values[:, 1])),
        None,
    ),
    "target_gap": lambda z, targets, tau: _target_gap_reference(z, targets, tau),
    "full_entropy": lambda z, targets, tau: (-(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1), None),
}


def _target_gap_reference(z, targets, tau):
    gap = z.max(-1).values - z.gather(1, targets[:, None]).squeeze(1)
    gate = (gap < 4 * tau) & (z.argmax(-1) != targets)
    return torch.where(gate, gap, torch.zeros_like(gap)), gate


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(USER_REFERENCES))
def test_user_objectives_equal_their_float64_references(family, name, restore_registry):
    """A user's top-2 hinge, a gated penalty of the target's logit, and the entropy through the generic full-logits
    path (autograd over [chunk x V]) each equal their reference, loss and gradients."""
    register_objective("hinge", hinge, top_k=2)
    register_objective("target_gap", target_gap, top_k=3, rows=True, gated=True)
    register_objective("full_entropy", full_entropy, top_k=2, full_logits=True)
    model, hidden, weight, targets = head_problem(family)
    h32, w32 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    settings = MRPSettings(objective=name, lam=LAM, tau=tau_of(family), chunk_size=6)
    mrp_loss_sums(h32, w32, targets, settings, transform=logit_transform(model)).total.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    valid = targets != -100
    z = emitted(model.config, h64[valid] @ w64.T)
    penalty, gate = USER_REFERENCES[name](z, targets[valid], tau_of(family))
    assert gate is None or 0 < int(gate.sum()) < gate.numel()  # the gate admits some positions, not all
    factor = valid.sum() / gate.sum() if gate is not None else 1.0
    want = F.cross_entropy(z, targets[valid], reduction="sum") + LAM * factor * penalty.sum()
    want.backward()
    got = mrp_loss_sums(hidden, weight, targets, settings, transform=logit_transform(model)).total
    torch.testing.assert_close(got.double(), want.detach(), **TOLERANCE)
    torch.testing.assert_close(h32.grad.double(), h64.grad, **TOLERANCE)
    torch.testing.assert_close(w32.grad.double(), w64.grad, **TOLERANCE)
