"""The registry's door: what a penalty is handed (TopK), what it may return, and the one-line refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_mrp import MRPUserError, TopK, register_objective
from hf_mrp.ops import MRPSettings, mrp_loss_sums
from hf_mrp.ops.objectives import objective_names, objectives_help, registry
from hf_mrp.ops.transform import LogitTransform


@pytest.fixture(autouse=True)
def restore_registry(monkeypatch):
    """User objectives registered by a test vanish after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def problem(n=10, vocab=23, width=6, seed=0):
    torch.manual_seed(seed)
    return torch.randn(n, width) * 2, torch.randn(vocab, width), torch.randint(0, vocab, (n,))


def run(objective, chunk_size=4, **options):
    hidden, weight, targets = problem()
    settings = MRPSettings(objective=objective, lam=0.5, chunk_size=chunk_size, **options)
    return mrp_loss_sums(hidden.requires_grad_(), weight, targets, settings)


def test_a_penalty_is_handed_one_chunk_of_exactly_what_it_reads():
    """values sorted descending (float32), their ids, targets, target logits, correctness, tau, the rows of
    W' = scale * W and the emitted (soft-capped) logits, never more than a chunk of positions."""
    seen: list[TopK] = []

    def spy(top: TopK) -> torch.Tensor:
        seen.append(top)
        return top.values[:, 0] * 0.0

    register_objective("spy", spy, top_k=3, rows=True, full_logits=True)
    hidden, weight, targets = problem()
    transform = LogitTransform(scale=0.5, softcap=3.0)
    mrp_loss_sums(hidden, weight, targets, MRPSettings(objective="spy", lam=1.0, chunk_size=4), transform=transform)
    assert [top.values.shape[0] for top in seen] == [4, 4, 2]
    z = transform.apply(hidden @ weight.T)
    values, ids = z.topk(3, -1)
    got = {name: torch.cat([getattr(top, name) for top in seen]) for name in ("values", "indices", "target")}
    torch.testing.assert_close(got["values"], values)  # float32 on both sides: the same operations
    assert torch.equal(got["indices"], ids) and torch.equal(got["target"], targets)
    assert all(top.values.dtype == torch.float32 and top.tau == 1.0 for top in seen)
    target_logit = torch.cat([top.target_logit for top in seen])
    torch.testing.assert_close(target_logit, z.gather(1, targets[:, None]).squeeze(1))
    assert torch.equal(torch.cat([top.correct for top in seen]), ids[:, 0] == targets)
    torch.testing.assert_close(torch.cat([top.rows for top in seen]), 0.5 * weight[ids])
    torch.testing.assert_close(torch.cat([top.logits for top in seen]), z)


def test_an_objective_registered_after_import_is_a_valid_choice_from_then_on():
    with pytest.raises(MRPUserError, match="unknown mrp_objective 'late'; choose one of margin, fisher, entropy"):
        MRPSettings(objective="late")
    register_objective("late", lambda top: top.values[:, 0] * 0.0, top_k=2, description="registered late")
    assert MRPSettings(objective="late").record.name == "late" and "late" in objective_names()
    assert "'late' (registered late)" in objectives_help()


@pytest.mark.parametrize(
    "penalty, options, message",
    [
        (lambda top: top.values, {}, r"objective 'bad': its penalty has shape \(4, 5\), expected \(4,\)"),
        (lambda top: top.values[:, 0].double(), {}, "objective 'bad': its penalty has dtype torch.float64, expected"),
        (lambda top: top.values[:, 0].tolist(), {}, "objective 'bad': its penalty must be a torch.Tensor"),
        (lambda top: torch.log(top.values[:, 0] * 0.0), {}, "objective 'bad': its penalty is not finite"),
        (
            lambda top: (top.values[:, 0], top.correct),
            {},
            "returned a .values, gate. pair; register it with gated=True",
        ),
        (lambda top: top.values[:, 0], {"gated": True}, "returned values alone; return .values, gate."),
        (lambda top: (top.values[:, 0], top.values[:, 0]), {"gated": True}, "its gate has dtype torch.float32"),
    ],
)
def test_a_bad_penalty_is_refused_in_one_line_naming_the_objective(penalty, options, message):
    register_objective("bad", penalty, **options)
    with pytest.raises(MRPUserError, match=message) as error:
        run("bad")
    assert "\n" not in str(error.value)


def test_non_finite_objective_weights_are_the_datas_fault_not_the_objectives():
    """NaN mrp_weights make the objective NaN (the trainers skip such a batch); the penalty itself is finite."""
    hidden, weight, targets = problem()
    weights = torch.ones(10)
    weights[3] = float("nan")
    sums = mrp_loss_sums(hidden, weight, targets, MRPSettings(objective="margin", lam=0.5), position_weights=weights)
    assert torch.isnan(sums.objective) and torch.isfinite(sums.ce)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("fisher", {}, "objective 'fisher' is built in; register yours under another name"),
        ("two words", {}, "an objective's name must be a word"),
        ("ok", {"top_k": 0}, "objective 'ok': top_k must be a positive integer or None"),
        ("ok", {"top_k": 2.5}, "objective 'ok': top_k must be a positive integer or None"),
        ("ok", {"rows": "yes"}, "objective 'ok': rows must be True or False"),
    ],
)
def test_a_bad_registration_is_refused_in_one_line(name, options, message):
    with pytest.raises(MRPUserError, match=message):
        register_objective(name, lambda top: top.values[:, 0], **options)
    with pytest.raises(MRPUserError, match="the penalty must be a function of one TopK"):
        register_objective("ok", "not a function")


def test_a_user_name_registered_again_is_replaced():
    """Re-running a notebook cell (or loading the same file twice) replaces the objective."""
    register_objective("twice", lambda top: top.values[:, 0] * 0.0, top_k=2)
    register_objective("twice", lambda top: -top.values[:, 0], top_k=2)
    hidden, weight, targets = problem()
    sums = mrp_loss_sums(hidden, weight, targets, MRPSettings(objective="twice", lam=1.0))
    torch.testing.assert_close(sums.objective, -(hidden @ weight.T).max(-1).values.sum())


def test_ce_weight_zero_trains_the_objective_alone():
    """mrp_ce_weight 0: the loss and gradient are lambda x the objective's; loss_ce still logs the CE."""
    hidden, weight, targets = problem()
    h = hidden.clone().requires_grad_()
    settings = MRPSettings(objective="proxy", lam=0.5, ce_weight=0.0, normalization="valid")
    sums = mrp_loss_sums(h, weight, targets, settings)
    sums.total.backward()
    alone = MRPSettings(objective="proxy", lam=0.5, normalization="valid")
    with_ce = mrp_loss_sums(hidden, weight, targets, alone)
    torch.testing.assert_close(sums.total, 0.5 * with_ce.objective)
    torch.testing.assert_close(sums.ce, F.cross_entropy(hidden @ weight.T, targets, reduction="sum"))
    h2 = hidden.clone().requires_grad_()
    (mrp_loss_sums(h2, weight, targets, alone).total - with_ce.ce).backward()
    h3 = hidden.clone().requires_grad_()
    F.cross_entropy(h3 @ weight.T, targets, reduction="sum").backward()
    torch.testing.assert_close(h.grad, h2.grad - h3.grad, rtol=1e-5, atol=1e-6)  # float32 sums of ~10 terms
    # W trained: no dense CE chunk writes W's gradient, so it is the objective's alone (the zeros it starts from)
    w1, w2, w3 = (weight.clone().requires_grad_() for _ in range(3))
    mrp_loss_sums(hidden, w1, targets, settings).total.backward()
    mrp_loss_sums(hidden, w2, targets, alone).total.backward()
    F.cross_entropy(hidden @ w3.T, targets, reduction="sum").backward()
    torch.testing.assert_close(w1.grad, w2.grad - w3.grad, rtol=1e-5, atol=1e-6)  # as above
    with pytest.raises(MRPUserError, match="mrp_ce_weight must be >= 0"):
        MRPSettings(ce_weight=-1.0)
