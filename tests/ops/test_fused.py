"""The fused chunked CE + objective against a naive float64 autograd reference."""

import pytest
import torch
import torch.nn.functional as F

from hf_mrp.errors import MRPUserError
from hf_mrp.ops import MRPSettings, mrp_loss_sums
from hf_mrp.ops.transform import LogitTransform

from helpers import head_bounds, naive_penalty


def naive_total(hidden, weight, bias, targets, objective, lam, tau, k):
    valid = targets != -100
    z = hidden[valid] @ weight.T + bias
    ce = F.cross_entropy(z, targets[valid], reduction="sum")
    return ce + lam * naive_penalty(z, weight, objective, tau, k).sum()


@pytest.mark.parametrize("objective", ["margin", "fisher", "entropy"])
@pytest.mark.parametrize("chunk_size", [3, 1000])
@pytest.mark.parametrize("vocab", [23, 400])  # W's top-k gradient rows outnumber V (kept dense), or do not (as rows)
def test_loss_and_gradients_match_float64_reference(objective, chunk_size, vocab):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 6)
    weight, bias = torch.randn(vocab, 6), torch.randn(vocab) * 0.1
    targets = torch.randint(0, vocab, (2, 9))
    targets[0, :3] = -100
    leaves32 = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    sums = mrp_loss_sums(
        leaves32[0],
        leaves32[1],
        targets,
        MRPSettings(objective=objective, lam=0.7, tau=1.5, top_k=4, chunk_size=chunk_size, normalization="valid"),
        bias=leaves32[2],
    )
    sums.total.backward()
    leaves64 = [t.double().clone().requires_grad_() for t in (hidden, weight, bias)]
    ref = naive_total(leaves64[0].reshape(-1, 6), leaves64[1], leaves64[2], targets.reshape(-1), objective, 0.7, 1.5, 4)
    ref.backward()
    assert sums.n_positions == 15
    loss_bound, grad_bound = head_bounds(6, vocab, 15, 4)
    torch.testing.assert_close(sums.total.double(), ref.detach(), rtol=loss_bound, atol=loss_bound)
    for got, want in zip(leaves32, leaves64):  # relative and relative to the largest entry (entries near 0)
        torch.testing.assert_close(
            got.grad.double(), want.grad, rtol=grad_bound, atol=grad_bound * want.grad.abs().max()
        )


def test_lambda_zero_is_plain_cross_entropy_and_weights_scale_the_objective():
    torch.manual_seed(1)
    hidden, weight = torch.randn(12, 5), torch.randn(17, 5)
    targets = torch.randint(0, 17, (12,))
    plain = mrp_loss_sums(hidden, weight, targets, MRPSettings(objective="fisher", lam=0.0, normalization="valid"))
    # two float32 computations of the same CE (d = 5, V = 17, 12 positions), positive terms: twice the bound
    bound = 2 * head_bounds(5, 17, 12, 0)[0]
    want = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    torch.testing.assert_close(plain.total, want, rtol=bound, atol=0)
    unweighted = mrp_loss_sums(
        hidden, weight, targets, MRPSettings(objective="entropy", lam=1.0, normalization="valid")
    )
    weights = torch.zeros(12)
    weights[:4] = 2.0
    weighted = mrp_loss_sums(
        hidden,
        weight,
        targets,
        MRPSettings(objective="entropy", lam=1.0, normalization="valid"),
        position_weights=weights,
    )
    per_position = -(torch.softmax(hidden @ weight.T, -1) * torch.log_softmax(hidden @ weight.T, -1)).sum(-1)
    # entropies are positive: two float32 computations, each within the bound of the sum, relative
    torch.testing.assert_close(unweighted.objective, per_position.sum(), rtol=bound, atol=0)
    torch.testing.assert_close(weighted.objective, 2 * per_position[:4].sum(), rtol=bound, atol=0)


def test_frozen_weight_gets_no_gradient_and_bad_arguments_fail():
    hidden = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(7, 3)
    mrp_loss_sums(
        hidden, weight, torch.tensor([1, 2, 3, 4]), MRPSettings(objective="fisher", lam=1.0, normalization="valid")
    ).total.backward()
    assert hidden.grad is not None and weight.grad is None
    with pytest.raises(MRPUserError, match="unknown mrp_objective 'nope'"):
        MRPSettings(objective="nope")
    with pytest.raises(MRPUserError, match="mrp_lambda must be >= 0"):
        MRPSettings(lam=-1.0)


def test_backward_scales_in_place_zeroes_a_skipped_batch_and_runs_once():
    """The incoming scalar scales the forward's gradients in place; an incoming exact 0 (a skipped micro-batch)
    gives exact zeros even where they are not finite; a second backward is refused, not silently rescaled."""
    torch.manual_seed(0)
    hidden = torch.randn(5, 3, requires_grad=True)
    weight = torch.randn(7, 3, requires_grad=True)
    settings = MRPSettings(objective="fisher", lam=0.5, normalization="valid")
    targets = torch.tensor([1, 2, 3, 4, 0])
    (mrp_loss_sums(hidden, weight, targets, settings).total * 1.0).backward()
    once_h, once_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (mrp_loss_sums(hidden, weight, targets, settings).total * 3.0).backward()
    # x 3 of float32 values: exact up to one rounding each (2^-24 relative)
    torch.testing.assert_close(hidden.grad, 3.0 * once_h, rtol=2**-23, atol=0)
    torch.testing.assert_close(weight.grad, 3.0 * once_w, rtol=2**-23, atol=0)
    hidden.grad = weight.grad = None
    with torch.no_grad():
        weight[2, 0] = float("nan")  # a non-finite weight: NaN logits and gradients
    (mrp_loss_sums(hidden, weight, targets, settings).total * 0.0).backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))
    loss = mrp_loss_sums(hidden, weight, targets, settings).total
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs backward once"):
        loss.backward()


TRANSFORMS = [LogitTransform(scale=0.25), LogitTransform(softcap=2.5), LogitTransform(scale=1.7, softcap=4.0)]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: t.describe())
@pytest.mark.parametrize("objective", ["margin", "fisher", "entropy"])
def test_logit_transform_loss_and_gradients_match_float64_reference(objective, transform):
    """Soft cap and scaling: the loss of the logits the model emits, exact gradients through the tanh."""
    torch.manual_seed(2)
    hidden = torch.randn(2, 7, 6) * 2
    weight, bias = torch.randn(19, 6), torch.randn(19) * 0.1
    targets = torch.randint(0, 19, (2, 7))
    targets[1, :2] = -100
    leaves32 = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    sums = mrp_loss_sums(
        leaves32[0],
        leaves32[1],
        targets,
        MRPSettings(objective=objective, lam=0.9, tau=2.0, top_k=3, chunk_size=4, normalization="valid"),
        bias=leaves32[2],
        transform=transform,
    )
    sums.total.backward()
    leaves64 = [t.double().clone().requires_grad_() for t in (hidden, weight, bias)]
    h, w, b = leaves64
    flat_targets = targets.reshape(-1)
    valid = flat_targets != -100
    z = transform.apply(h.reshape(-1, 6)[valid] @ w.T + b)
    ref = F.cross_entropy(z, flat_targets[valid], reduction="sum") + 0.9 * naive_penalty(z, w, objective, 2.0, 3).sum()
    ref.backward()
    # the transform (scale, then c tanh(x / c)) adds two roundings per logit: 2 more terms on the chain
    loss_bound, grad_bound = head_bounds(6 + 2, 19, 14, 3)
    torch.testing.assert_close(sums.total.double(), ref.detach(), rtol=loss_bound, atol=loss_bound)
    for got, want in zip(leaves32, leaves64):
        torch.testing.assert_close(
            got.grad.double(), want.grad, rtol=grad_bound, atol=grad_bound * want.grad.abs().max()
        )


def test_gated_normalization_divides_the_margin_objective_by_the_gated_positions():
    torch.manual_seed(3)
    hidden = torch.randn(20, 5, requires_grad=True)
    weight = torch.randn(11, 5)
    targets = torch.randint(0, 11, (20,))
    gated = mrp_loss_sums(
        hidden, weight, targets, MRPSettings(objective="margin", lam=0.5, tau=1.0, normalization="gated")
    )
    z = hidden.detach().double() @ weight.double().T
    top = z.topk(2, -1).values
    m = top[:, 0] - top[:, 1]
    n_gated = int((m < 1.0).sum())
    assert 0 < n_gated < 20 and gated.n_gated == n_gated
    # divided by the valid positions (as the Trainer does) it is the paper's mean over gated positions
    # float32 margins (a dot of d = 5, two of them) summed over 20 positions, against float64
    loss_bound, grad_bound = head_bounds(5, 11, 20, 0)
    torch.testing.assert_close(gated.objective.double() / 20, -m[m < 1.0].mean(), rtol=loss_bound, atol=0)
    gated.total.backward()
    grad_gated = hidden.grad.clone()
    hidden.grad = None
    ce = mrp_loss_sums(hidden, weight, targets, MRPSettings(objective="margin", lam=0.0, normalization="valid"))
    valid = mrp_loss_sums(
        hidden, weight, targets, MRPSettings(objective="margin", lam=0.5 * 20 / n_gated, tau=1.0, normalization="valid")
    )
    valid.total.backward()
    # the same sums; only the scale of the objective is applied at another place (lambda x 20 / n_gated, rounded
    # once, against a division by n_gated): a few roundings, within the float32 bounds of each side, 2x
    torch.testing.assert_close(gated.total, valid.total, rtol=2 * loss_bound, atol=0)
    torch.testing.assert_close(
        grad_gated, hidden.grad, rtol=2 * grad_bound, atol=2 * grad_bound * hidden.grad.abs().max()
    )
    fisher = mrp_loss_sums(hidden, weight, targets, MRPSettings(objective="fisher", lam=0.5, normalization="gated"))
    same = mrp_loss_sums(hidden, weight, targets, MRPSettings(objective="fisher", lam=0.5, normalization="valid"))
    assert torch.equal(fisher.total, same.total)  # only the margin objective has a gate: the same computation
    assert torch.isfinite(ce.total)
