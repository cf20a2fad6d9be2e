"""The geometry audit on a tiny model against a naive full-logits float64 reference."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from hf_mrp.audit import load_audit, run_audit
from hf_mrp.errors import MRPUserError
from hf_mrp.ops import fit_gap_law

from helpers import decided, llama_logit_magnitude, spearman_atol, tiny_model_bounds


def logit_atol(model, positions: int = 108, length: int = 24) -> float:
    """The audit's float32 forward (its batches) and the reference's (the whole batch, float64 head): other kernels,
    each within the tiny decoder's bound of the exact logits' magnitudes, so a logit of either is off by at most
    twice it."""
    return 2 * tiny_model_bounds(positions=positions, length=length)[0] * llama_logit_magnitude(model)


def reference_logits(model, blocks, layer=None):
    """Full float64 logits of every evaluated position, straight from the backbone."""
    ids = torch.as_tensor(blocks.input_ids)
    with torch.no_grad():
        out = model.model(input_ids=ids, output_hidden_states=True)
        hidden = out.last_hidden_state if layer is None else out.hidden_states[layer + 1]
        if layer is not None and layer < model.config.num_hidden_layers - 1:
            hidden = model.model.norm(hidden)
    z = (hidden[:, :-1].double() @ model.lm_head.weight.double().T).detach()
    mask = torch.as_tensor(blocks.position_mask())
    return z[mask], ids[:, 1:][mask]


@pytest.mark.parametrize("chunk_size, batch_size", [(1000, 8), (7, 2)])
def test_audit_matches_reference(model, blocks, tmp_path, chunk_size, batch_size):
    result = run_audit(model, blocks, output_dir=tmp_path, chunk_size=chunk_size, batch_size=batch_size, progress=False)
    z, targets = reference_logits(model, blocks)
    top = z.topk(2)
    positions = result.positions
    assert len(positions["margin"]) == blocks.n_positions == 108  # 7 positions beyond max_positions are excluded
    atol = logit_atol(model)
    margins = (top.values[:, 0] - top.values[:, 1]).numpy()
    np.testing.assert_allclose(positions["margin"], margins, rtol=0, atol=2 * atol)  # two logits
    sure = decided(margins, atol)  # top-1 compared where no rounding can swap it
    assert sure.mean() > 0.9
    want_correct = (top.indices[:, 0] == targets).numpy()
    np.testing.assert_array_equal(positions["correct"][sure], want_correct[sure])
    np.testing.assert_array_equal(positions["target_id"], targets.numpy())
    probs = torch.softmax(z, -1)
    entropy = (-(probs * probs.log()).sum(-1)).numpy()
    # the entropy is 2 max(1, |z|max)-Lipschitz in the logits (max norm)
    entropy_atol = 2 * max(1.0, float(z.abs().max())) * atol
    np.testing.assert_allclose(positions["entropy"], entropy, rtol=0, atol=entropy_atol)
    s = result.summary
    assert abs(s.accuracy - want_correct.mean()) <= (~sure).mean() + 1e-12  # only undecided positions may differ
    rho = spearmanr(entropy, margins).statistic
    assert s.entropy_margin_spearman == pytest.approx(rho, abs=spearman_atol(entropy, margins, atol=entropy_atol))
    assert s.median_margin == s.margin_percentiles["p50"] == pytest.approx(np.median(margins), abs=2 * atol)
    # the same float64 fit of the same float32 margins: one computation, equal
    assert s.gap_fit.beta == fit_gap_law(positions["margin"]).beta
    for name in ("audit.json", "positions.parquet", "blocks.npy", "gap_curve.png", "margins.png"):
        assert (tmp_path / name).stat().st_size > 0
    loaded = load_audit(tmp_path)
    np.testing.assert_array_equal(loaded.blocks.input_ids, blocks.input_ids)
    np.testing.assert_array_equal(loaded.positions["margin"], positions["margin"])
    assert json.loads((tmp_path / "audit.json").read_text())["n_positions"] == 108


def test_logit_lens_layers(model, blocks, tmp_path):
    result = run_audit(model, blocks, output_dir=tmp_path, layers="all", progress=False)
    assert [row["layer"] for row in result.layers] == [0, 1, 2]
    final_ce = -result.positions["target_logprob"]
    for layer in (0, 2):
        z, targets = reference_logits(model, blocks, layer)
        top = z.topk(2)
        row = result.layers[layer]
        atol = logit_atol(model)
        margin = (top.values[:, 0] - top.values[:, 1]).numpy()
        undecided = (~decided(margin, atol)).mean()  # only near ties may change the accuracy
        assert abs(row["accuracy"] - (top.indices[:, 0] == targets).double().mean().item()) <= undecided + 1e-12
        assert row["margin_percentiles"]["p50"] == pytest.approx(np.median(margin), abs=2 * atol)
        penalty = np.where(margin < 1.0, -margin, 0.0)
        rho = spearmanr(penalty, final_ce).statistic  # final CE: 2-Lipschitz in the logits
        assert row["spearman_margin_vs_final_ce"] == pytest.approx(
            rho, abs=spearman_atol(penalty, final_ce, atol=2 * atol)
        )
    layers_json = json.loads((tmp_path / "layers.json").read_text())
    negative = [r["layer"] for r in result.layers if r["spearman_fisher_vs_final_ce"] < 0]
    assert layers_json["negative_fisher_correlation"] == negative
    assert (tmp_path / "layers.png").stat().st_size > 0


def test_bfloat16_model_keeps_float32_margins(blocks):
    from helpers import tiny_llama

    model = tiny_llama().to(torch.bfloat16)
    exact = run_audit(model, blocks, progress=False)
    low = run_audit(model, blocks, margin_dtype="model", progress=False)
    assert exact.summary.n_unique_margins > low.summary.n_unique_margins
    assert exact.summary.provenance["model_dtype"] == "bfloat16"


def test_audit_errors(model, blocks, tmp_path):
    with pytest.raises(MRPUserError, match="out of range"):
        run_audit(model, blocks, layers="5", progress=False)
    with pytest.raises(MRPUserError, match="margin_dtype"):
        run_audit(model, blocks, margin_dtype="float8", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MRPUserError, match="is a file"):
        run_audit(model, blocks, output_dir=tmp_path / "file", progress=False)
    with pytest.raises(MRPUserError, match="no complete audit"):
        load_audit(tmp_path)


def test_blocks_that_evaluate_nothing_are_refused_before_any_work(model, blocks):
    """Zero positions (a count of 0, or chats whose every label is -100) have no margin to audit: one line, from
    run_audit and from MRPAuditCallback's constructor (before training), instead of an IndexError at the end."""
    from hf_mrp.data import Blocks, labeled_blocks
    from hf_mrp.training.callbacks import MRPAuditCallback

    nothing = [Blocks(blocks.input_ids, 0, "random"), labeled_blocks([[5, 6, 7]], [[-100, -100, -100]], pad_id=0)]
    for empty in nothing:
        with pytest.raises(MRPUserError, match="evaluate no position: nothing to audit"):
            run_audit(model, empty, progress=False)
        with pytest.raises(MRPUserError, match="evaluate no position"):
            MRPAuditCallback(empty)
    with pytest.raises(MRPUserError, match="an audit needs hf_mrp Blocks, got list"):
        MRPAuditCallback(blocks.input_ids.tolist())


def test_model_without_output_embeddings(blocks):
    from transformers import LlamaConfig, LlamaModel

    backbone = LlamaModel(
        LlamaConfig(
            vocab_size=97,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(MRPUserError, match="no output embeddings"):
        run_audit(backbone, blocks, progress=False)


def test_a_batch_without_evaluated_positions_is_audited_as_absent(model):
    """A chat whose assistant turn was cut off leaves a row with no evaluated position: a batch of only such rows
    adds nothing (before, the audit crashed on it), and the other rows' numbers equal those of an audit without
    it, with the same layers."""
    from hf_mrp.data import labeled_blocks

    rng = np.random.default_rng(4)
    rows = [rng.integers(3, 90, size=14).tolist() for _ in range(3)]
    labels = [row[:4] + [-100] * 10 for row in rows]
    labels[1] = [-100] * 14  # no evaluated position
    with_empty = run_audit(model, labeled_blocks(rows, labels, pad_id=0), batch_size=1, layers=[0], progress=False)
    kept = [0, 2]
    without = labeled_blocks([rows[i] for i in kept], [labels[i] for i in kept], pad_id=0)
    reference = run_audit(model, without, batch_size=1, layers=[0], progress=False)
    assert len(with_empty.positions["margin"]) == 2 * 3
    np.testing.assert_array_equal(with_empty.positions["block"], [0, 0, 0, 2, 2, 2])
    for name, column in reference.positions.items():
        if name != "block":
            np.testing.assert_array_equal(with_empty.positions[name], column, err_msg=name)
    assert with_empty.layers == reference.layers and [row["layer"] for row in reference.layers] == [0]
