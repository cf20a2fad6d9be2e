"""decision_statistics against a naive float64 full-logits reference."""

import numpy as np
import pytest
import torch

from hf_mrp.ops import decision_statistics
from hf_mrp.ops.transform import LogitTransform

from helpers import gamma


def naive_statistics(hidden, weight, bias, targets, scale=1.0, softcap=None):
    """Plain float64 loops over the full logits: an independent reference (soft cap written out)."""
    raw = (hidden.double() @ weight.double().T + (0 if bias is None else bias.double())) * scale
    z = raw if softcap is None else softcap * torch.tanh(raw / softcap)
    rows = []
    for t in range(z.shape[0]):
        logits = z[t].numpy()
        order = np.argsort(-logits, kind="stable")
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        y = int(targets[t])
        best_other = max(logits[j] for j in range(len(logits)) if j != y)
        w = weight.double().numpy() * scale
        raw_t = raw[t].numpy()
        rows.append(
            {
                "top1_id": order[0],
                "top2_id": order[1],
                "margin": logits[order[0]] - logits[order[1]],
                "correct": order[0] == y,
                "entropy": -(probs * np.log(probs)).sum(),
                "p_top1": probs[order[0]],
                "target_logprob": np.log(probs[y]),
                "target_margin": logits[y] - best_other,
                "geometric_margin": (raw_t[order[0]] - raw_t[order[1]]) / np.linalg.norm(w[order[0]] - w[order[1]]),
                "brier": 1 - 2 * probs[y] + (probs**2).sum(),
            }
        )
    return {key: np.array([r[key] for r in rows]) for key in rows[0]}


def logit_error(hidden, weight, bias=None, scale=1.0) -> float:
    """The worst-case float32 error of any logit (a dot of d terms plus a bias, scaled): gamma(d + 1) of
    max_ti scale (sum_j |h_tj w_ij| + |b_i|). A soft cap c tanh(x / c) is 1-Lipschitz: it adds only its own rounding."""
    magnitude = hidden.double().abs() @ weight.double().abs().T + (0 if bias is None else bias.double().abs())
    return gamma(hidden.shape[-1] + 1) * scale * float(magnitude.max())


def statistics_atol(hidden, weight, bias=None, scale=1.0) -> float:
    """float32 statistics against the exact ones (float64's own error, 2^-53, is negligible): each statistic is a
    function of the logits with Lipschitz constant (max norm) at most 2 max(1, |z|max) (margins and log-probabilities
    2, probabilities and Brier 2, entropy 2 |z|max; the geometric margin's norm of d terms adds gamma(d) relative),
    and its own float32 reduction over the V logits adds gamma(V) of its magnitude; 2x margin."""
    z = (hidden.double() @ weight.double().T + (0 if bias is None else bias.double())) * scale
    lipschitz = 2 * max(1.0, float(z.abs().max()))
    return 2 * lipschitz * (logit_error(hidden, weight, bias, scale) + gamma(weight.shape[0]) + gamma(hidden.shape[-1]))


@pytest.mark.parametrize("with_bias", [False, True])
def test_statistics_match_float64_reference(with_bias):
    torch.manual_seed(1)
    hidden, weight = torch.randn(40, 8), torch.randn(30, 8) * 2
    bias = torch.randn(30) if with_bias else None
    targets = torch.randint(0, 30, (40,))
    targets[:10] = torch.topk(hidden[:10] @ weight.T + (0 if bias is None else bias), 1).indices[:, 0]  # some correct
    got = decision_statistics(hidden, weight, targets, bias, chunk_size=7)
    ref = naive_statistics(hidden, weight, bias, targets)
    for key in ("top1_id", "top2_id", "correct"):
        np.testing.assert_array_equal(got[key].numpy(), ref[key], err_msg=key)
    atol = statistics_atol(hidden, weight, bias)
    for key in ("margin", "entropy", "p_top1", "target_logprob", "target_margin", "geometric_margin", "brier"):
        np.testing.assert_allclose(got[key].numpy(), ref[key], rtol=0, atol=atol, err_msg=key)
    assert got["correct"][:10].all()


@pytest.mark.parametrize("scale, softcap", [(0.5, None), (1.0, 3.0), (2.0, 5.0)])
def test_statistics_of_transformed_logits_match_float64_reference(scale, softcap):
    """Scaled (Cohere, Granite) and soft-capped (Gemma) logits: every statistic of the emitted logits."""
    torch.manual_seed(4)
    hidden, weight, bias = torch.randn(30, 8), torch.randn(25, 8) * 2, torch.randn(25)
    targets = torch.randint(0, 25, (30,))
    got = decision_statistics(
        hidden, weight, targets, bias, chunk_size=8, transform=LogitTransform(scale=scale, softcap=softcap)
    )
    ref = naive_statistics(hidden, weight, bias, targets, scale, softcap)
    for key in ("top1_id", "top2_id", "correct"):
        np.testing.assert_array_equal(got[key].numpy(), ref[key], err_msg=key)
    atol = statistics_atol(hidden, weight, bias, scale)  # the soft cap is 1-Lipschitz: the scaled logits' bound
    for key in ("margin", "entropy", "p_top1", "target_logprob", "target_margin", "geometric_margin", "brier"):
        np.testing.assert_allclose(got[key].numpy(), ref[key], rtol=0, atol=atol, err_msg=key)


def test_chunk_size_changes_nothing():
    torch.manual_seed(2)
    hidden, weight, targets = torch.randn(50, 8), torch.randn(40, 8), torch.randint(0, 40, (50,))
    a = decision_statistics(hidden, weight, targets, chunk_size=1)
    b = decision_statistics(hidden, weight, targets, chunk_size=1024)
    for key in ("top1_id", "top2_id", "correct"):
        assert torch.equal(a[key], b[key]), key
    # the BLAS kernel differs by chunk shape: two float32 computations, each within statistics_atol / 2 (its margin
    # removed) of the exact statistics, so within statistics_atol of each other
    atol = statistics_atol(hidden, weight)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def test_float32_logits_even_for_bfloat16_inputs():
    """bf16 hidden states and weights are upcast before the matmul, unless low precision is asked for."""
    torch.manual_seed(3)
    hidden, weight = torch.randn(200, 16).bfloat16(), torch.randn(500, 16).bfloat16()
    targets = torch.randint(0, 500, (200,))
    exact = (hidden.double() @ weight.double().T).topk(2).values
    got = decision_statistics(hidden, weight, targets)["margin"]
    # bf16 -> float32 is exact, so float32 logits of the same values: two logits, each within logit_error; 2x margin
    atol = 2 * 2 * logit_error(hidden, weight)
    np.testing.assert_allclose(got.numpy(), (exact[:, 0] - exact[:, 1]).numpy(), rtol=0, atol=atol)
    low = decision_statistics(hidden, weight, targets, margin_dtype=torch.bfloat16)["margin"]
    assert np.unique(low.numpy()).size < np.unique(got.numpy()).size  # the bf16 margin artifact


def test_ops_imports_nothing_from_the_hf_stack():
    import subprocess
    import sys

    code = (
        "import sys, hf_mrp.ops, hf_mrp.stats, hf_mrp.stats.flips, hf_mrp.stats.token_classes, "
        "hf_mrp.stats.calibration, hf_mrp.stats.intervals; "
        "print([m for m in ('transformers', 'peft', 'accelerate', 'datasets') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_position_gives_every_column_empty_with_its_dtype():
    """An audit batch whose rows evaluate nothing still gets every column (of its usual dtype), empty."""
    from hf_mrp.ops.lens import lens_statistics

    torch.manual_seed(0)
    weight, some = torch.randn(11, 8), torch.randn(3, 8)
    targets = torch.tensor([1, 2, 3])
    none = torch.zeros(0, 8)
    no_targets = torch.zeros(0, dtype=torch.long)
    for got, want in (
        (decision_statistics(none, weight, no_targets), decision_statistics(some, weight, targets)),
        (lens_statistics(none, {0: none}, weight, no_targets)[0], lens_statistics(some, {0: some}, weight, targets)[0]),
    ):
        assert got.keys() == want.keys()
        assert all(got[key].shape == (0,) and got[key].dtype == want[key].dtype for key in want)
