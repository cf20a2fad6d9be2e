"""Layer-wise lens statistics (KL to the final layer, agreement, target rank, entropy, CE) against a naive float64
computation through the model's own forward, on tiny models of several families (soft-capped Gemma included)."""

import json

import numpy as np
import pytest
import torch

from hf_mrp.audit import run_audit
from hf_mrp.audit.collect import collect_statistics
from hf_mrp.audit.layers import summarize_layers
from hf_mrp.data import Blocks
from hf_mrp.models import decoder_layers, final_norm, output_head
from hf_mrp.ops import decision_statistics
from hf_mrp.ops.lens import AffineTranslators, lens_statistics

from helpers import FAMILIES, VOCAB, build, chain_bound, decided, tiny_model_bounds

pytestmark = pytest.mark.filterwarnings("ignore")

LENS_FAMILIES = ["llama", "gemma2", "gemma3", "cohere", "granite", "gpt2", "phi", "qwen3"]


def blocks_of(rows=3, length=12, seed=0, skip=2) -> Blocks:
    ids = np.random.default_rng(seed).integers(3, VOCAB, size=(rows, length))
    return Blocks(ids, rows * (length - 1) - skip, "random")


@torch.no_grad()
def reference_logits(model64, ids: torch.Tensor, layer: int, translate=None) -> torch.Tensor:
    """float64 logits the model itself emits when its final norm reads layer ``layer``'s output (optionally
    translated first): the model's own head and logit transform (soft cap, scaling), no hf_mrp code."""
    captured = {}
    layer_hook = decoder_layers(model64)[layer].register_forward_hook(
        lambda module, args, output: captured.__setitem__("h", output[0] if isinstance(output, tuple) else output)
    )
    norm = final_norm(model64)

    def replace(module, args, output):
        states = captured["h"] if translate is None else translate(captured["h"])
        return module.forward(states)

    norm_hook = norm.register_forward_hook(replace)
    try:
        logits = model64(input_ids=ids).logits.double()
    finally:
        layer_hook.remove()
        norm_hook.remove()
    return logits[:, :-1]


def naive_statistics(final: torch.Tensor, layer: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
    log_pf, log_pl = torch.log_softmax(final, -1), torch.log_softmax(layer, -1)
    target = layer.gather(1, targets[:, None])
    return {
        "kl_to_final": (log_pf.exp() * (log_pf - log_pl)).sum(-1).numpy(),
        "agrees_with_final": (layer.argmax(-1) == final.argmax(-1)).numpy(),
        "target_rank": (1 + (layer > target).sum(-1)).numpy(),
        "entropy": (-(log_pl.exp() * log_pl).sum(-1)).numpy(),
        "target_logprob": log_pl.gather(1, targets[:, None]).squeeze(1).numpy(),
        "correct": (layer.argmax(-1) == targets).numpy(),
    }


def top2_gap(z: torch.Tensor) -> np.ndarray:
    top = z.topk(2, -1).values
    return (top[:, 0] - top[:, 1]).numpy()


def assert_matches_reference(columns: dict, final: torch.Tensor, layer: torch.Tensor, targets, where: str) -> None:
    """The float32 lens columns against the float64 model's: each logit within the float32 tiny decoder's bound (2
    layers, rows of 12; + a translator's dot of 33 terms) of the largest logit. Every statistic within its Lipschitz
    constant (max norm) times that; an argmax, or the target's rank, compared only where no logit within two such
    errors can swap it."""
    expected = naive_statistics(final, layer, targets)
    scale = max(float(final.abs().max()), float(layer.abs().max()))
    atol = (tiny_model_bounds(layers=2, positions=len(targets), length=12)[0] + chain_bound(33)) * scale
    log_gap = float((torch.log_softmax(final, -1) - torch.log_softmax(layer, -1)).abs().max())
    for name, lipschitz in (
        ("kl_to_final", 2 * (1 + log_gap)),
        ("entropy", 2 * max(1.0, scale)),
        ("target_logprob", 2),
    ):
        np.testing.assert_allclose(columns[name], expected[name], rtol=0, atol=lipschitz * atol, err_msg=where)
    layer_sure, final_sure = decided(top2_gap(layer), atol), decided(top2_gap(final), atol)
    target = layer.gather(1, targets[:, None])
    others = (layer - target).abs().scatter(1, targets[:, None], float("inf"))
    rank_sure = (others.min(-1).values > 2 * atol).numpy()
    for name, sure in (
        ("agrees_with_final", layer_sure & final_sure),
        ("correct", layer_sure),
        ("target_rank", rank_sure),
    ):
        assert sure.mean() > 0.8, (where, name)
        np.testing.assert_array_equal(columns[name][sure], expected[name][sure], err_msg=f"{where}: {name}")


@pytest.mark.parametrize("family", LENS_FAMILIES)
def test_logit_lens_statistics_equal_a_naive_float64_computation(family):
    model, model64 = build(family), build(family, dtype=torch.float64)
    blocks = blocks_of()
    n_layers = len(decoder_layers(model))
    _, per_layer = collect_statistics(
        model, blocks, batch_size=2, chunk_size=7, layers=list(range(n_layers)), progress=False
    )
    ids = torch.as_tensor(blocks.input_ids)
    mask = torch.as_tensor(blocks.position_mask())
    targets = ids[:, 1:][mask]
    with torch.no_grad():
        final = model64(input_ids=ids).logits.double()[:, :-1][mask]
    for layer in range(n_layers):
        layer_logits = reference_logits(model64, ids, layer)[mask]
        assert_matches_reference(per_layer[layer], final, layer_logits, targets, f"{family} layer {layer}")
    assert np.all(per_layer[n_layers - 1]["kl_to_final"] == 0.0)  # the final layer against itself: exactly 0
    assert per_layer[n_layers - 1]["agrees_with_final"].all()


@pytest.mark.parametrize("family", ["gemma2", "llama", "phi"])
def test_tuned_lens_statistics_equal_a_naive_float64_computation_through_the_translator(family):
    model, model64 = build(family), build(family, dtype=torch.float64)
    blocks = blocks_of(seed=1)
    width = output_head(model)[0].shape[1]
    translators = AffineTranslators([0], width)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        translators.weights[0].copy_(0.3 * torch.randn(width, width, generator=generator))
        translators.biases[0].copy_(0.5 * torch.randn(width, generator=generator))
    _, per_layer = collect_statistics(
        model, blocks, batch_size=2, chunk_size=5, layers=[0, 1], progress=False, translators=translators
    )
    ids = torch.as_tensor(blocks.input_ids)
    mask = torch.as_tensor(blocks.position_mask())
    targets = ids[:, 1:][mask]
    with torch.no_grad():
        final = model64(input_ids=ids).logits.double()[:, :-1][mask]
    a, c = translators.weights[0].detach().double(), translators.biases[0].detach().double()
    tuned = reference_logits(model64, ids, 0, translate=lambda h: h + h @ a.T + c)[mask]
    assert_matches_reference(per_layer[0], final, tuned, targets, f"{family} tuned layer 0")
    logit = reference_logits(model64, ids, 0)[mask]
    assert_matches_reference(per_layer[("logit", 0)], final, logit, targets, f"{family} logit 0")
    np.testing.assert_array_equal(per_layer[1]["kl_to_final"], per_layer[("logit", 1)]["kl_to_final"])


@pytest.mark.parametrize("family", FAMILIES)
def test_an_identity_tuned_lens_is_the_logit_lens_on_every_family(family):
    """Untrained translators are the identity: the tuned lens' columns equal the logit lens' exactly (final norm,
    soft cap and scaling are applied alike on every family of the conformance matrix)."""
    model = build(family)
    n_layers = len(decoder_layers(model))
    translators = AffineTranslators(list(range(n_layers - 1)), output_head(model)[0].shape[1])
    _, per_layer = collect_statistics(
        model, blocks_of(), batch_size=2, layers=list(range(n_layers)), progress=False, translators=translators
    )
    for layer in range(n_layers):
        for name, values in per_layer[layer].items():
            np.testing.assert_array_equal(values, per_layer[("logit", layer)][name], err_msg=f"{layer} {name}")
    assert per_layer[0]["kl_to_final"].mean() > 0


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_margin_columns_are_bit_identical_to_decision_statistics(family):
    """The columns layers.json summarized before the lens statistics existed are computed bit for bit as
    `decision_statistics` computes them, so existing keys of layers.json keep their values."""
    model = build(family)
    norm, (weight, bias) = final_norm(model), output_head(model)
    from hf_mrp.models import logit_transform

    transform = logit_transform(model)
    torch.manual_seed(0)
    final, layer = torch.randn(23, weight.shape[1]), norm(torch.randn(23, weight.shape[1]))
    targets = torch.randint(0, VOCAB, (23,))
    lens = lens_statistics(final, {0: layer}, weight, targets, bias, chunk_size=6, transform=transform)[0]
    plain = decision_statistics(layer, weight, targets, bias, chunk_size=6, transform=transform)
    for name in ("margin", "correct", "fisher_penalty", "margin_penalty"):
        assert torch.equal(lens[name], plain[name]), name


def test_layer_rows_hold_the_lens_statistics_and_bootstrap_intervals(tmp_path):
    model = build("llama")
    blocks = blocks_of(rows=6, length=16, seed=3)
    result = run_audit(model, blocks, output_dir=tmp_path, layers="all", progress=False, lens_bootstrap=40)
    _, per_layer = collect_statistics(model, blocks, layers=[0, 1], progress=False)
    final_ce = -result.positions["target_logprob"]
    for row in result.layers:  # float64 means of the same float32 columns: pytest.approx's 1e-6 >> n 2^-53
        columns = per_layer[row["layer"]]
        rank = columns["target_rank"]
        assert row["mean_kl_to_final"] == pytest.approx(columns["kl_to_final"].astype(np.float64).mean())
        assert row["agreement_with_final"] == pytest.approx(columns["agrees_with_final"].mean())
        assert row["target_rank"] == pytest.approx(
            {"median": np.median(rank), "top1_rate": np.mean(rank == 1), "top5_rate": np.mean(rank <= 5)}
        )
        assert row["target_rank"]["top1_rate"] == pytest.approx(row["accuracy"])
        assert row["mean_cross_entropy"] == pytest.approx(-columns["target_logprob"].astype(np.float64).mean())
        assert "curve" not in row["gap_fit"] and row["gap_fit"]["fit_points"] >= 0
        for name, (low, high) in row["intervals"].items():
            assert low <= row[name] + 1e-9 and row[name] - 1e-9 <= high, (name, low, row[name], high)
    assert result.layers[-1]["mean_kl_to_final"] == 0.0
    rows_again = summarize_layers(per_layer, final_ce, result.positions["block"], 40)
    assert rows_again == result.layers
    written = json.loads((tmp_path / "layers.json").read_text())
    assert written["lens"] == "logit" and "logit_lens_layers" not in written
    assert written["layers"][0]["intervals"] == result.layers[0]["intervals"]
    for name in ("lens_heatmap.png", "lens_curves.png", "layers.png"):
        assert (tmp_path / name).stat().st_size > 0
