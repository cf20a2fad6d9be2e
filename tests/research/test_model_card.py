"""The model card: base model Hub id (the embedded model's source), datasets, flip tables at each evaluation."""

import json

from hf_mrp.audit.summary import AuditSummary
from hf_mrp.models import EMBEDDED_NAME
from hf_mrp.ops.gap import GapFit
from hf_mrp.research.reports.model_card import evaluation_comparisons, hub_base_model, model_card

SUMMARY = AuditSummary(
    provenance={},
    n_positions=10,
    accuracy=0.5,
    margin_percentiles={"p50": 1.0},
    mean_margin=1.1,
    fraction_margin_lt_0_5=0.2,
    entropy_margin_spearman=-0.5,
    gap_fit=GapFit(beta=1.0, intercept=0.0, r_squared=0.9, alpha=0.3, eps_min=0.01, eps_max=0.5, fit_points=32),
    n_unique_margins=10,
    mean_entropy=1.5,
    mean_cross_entropy=2.0,
    ece=0.05,
    brier=0.4,
)


def flips(w2r, r2w, classes=("entity", "content")):
    group = {"n": 5, "w2r": w2r, "r2w": r2w, "net": w2r - r2w, "accuracy_before": 0.4, "accuracy_after": 0.6}
    return {
        "w2r": w2r,
        "r2w": r2w,
        "net": w2r - r2w,
        "churn": 0.25,
        "median_margin_change": 0.1,
        "accuracy_after": 0.6,
        "ece_after": 0.04,
        "by_class": {c: group for c in classes},
        "by_bucket": {"1": group, "100+": group},
        "accuracy_by_margin_band": {"<0.5": group},
    }


def test_base_model_id_is_known_for_the_embedded_model_hub_ids_and_gguf_repos(tmp_path):
    assert hub_base_model(EMBEDDED_NAME) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert hub_base_model("someone/Model-GGUF/model.Q4_K_M.gguf") == "someone/Model-GGUF"
    assert hub_base_model(str(tmp_path)) is None  # a local folder has no Hub id
    assert hub_base_model("/models/x.gguf") is None and hub_base_model(None) is None


def test_card_names_base_model_datasets_and_every_evaluation_step(tmp_path):
    for step, (w2r, r2w) in ((20, (3, 1)), (40, (7, 2))):
        folder = tmp_path / f"comparison_step_{step}"
        folder.mkdir()
        (folder / "flip_audit.json").write_text(json.dumps(flips(w2r, r2w)))
    (tmp_path / "comparison_step_60").mkdir()  # incomplete (no JSON): not an evaluation
    evaluations = evaluation_comparisons(tmp_path)
    assert [step for step, _ in evaluations] == [20, 40]

    card = model_card(
        EMBEDDED_NAME,
        {"mrp_objective": "fisher"},
        SUMMARY,
        SUMMARY,
        data_arguments={
            "dataset": "Salesforce/wikitext",
            "dataset_config": "wikitext-2-raw-v1",
            "split": "train",
            "block_size": 256,
        },
        evaluations=evaluations,
    )
    header = card.split("---")[1]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in header
    assert "datasets:\n- Salesforce/wikitext" in header
    assert "GGUF conversion of [`HuggingFaceTB/SmolLM2-135M-Instruct`]" in card
    assert "| 20 | 3 | 1 | 2 | 25.0% |" in card and "| 40 | 7 | 2 | 5 | 25.0% |" in card
    for step in (20, 40):
        assert f"Step {step}: flips by token class, frequency bucket and margin band" in card
    assert "| entity | 5 | 7 | 2 | 5 |" in card and "| 100+ | 5 | 7 | 2 | 5 |" in card

    local = model_card(str(tmp_path), {}, SUMMARY, SUMMARY, data_arguments={"dataset": str(tmp_path / "a.jsonl")})
    assert "base_model:" not in local and "datasets:" not in local and "no Hub id is known" in local
    embedded_data = model_card("Qwen/Qwen2.5-0.5B", {}, SUMMARY, SUMMARY, data_arguments={"dataset": None})
    assert "datasets:" not in embedded_data and "`pydoc_data.topics`" in embedded_data


def test_the_card_shows_the_manifold_per_layer_before_and_after():
    """Both audits measured the manifold: one row per layer, each statistic before -> after; one audit without
    it: no section."""
    import dataclasses

    def entry(value):
        line = {"layer": 3, "participation_ratio": value, "variance_dims_90": 7, "intrinsic_dimension_twonn": 9.5}
        line.update(intrinsic_dimension_mle=8.25, curvature=0.125)
        return {"manifold": {"by_layer": [line], "sampled_positions": 40, "audited_positions": 50, "k": 20}}

    before = dataclasses.replace(SUMMARY, layers=entry(2.5))
    after = dataclasses.replace(SUMMARY, layers=entry(4.0))
    card = model_card("m", {}, before, after)
    assert "Hidden-state manifold per layer, before -> after (40 of 50 audited positions" in card
    assert "| 3 | 2.500 -> 4.000 | 7.000 -> 7.000 | 9.500 -> 9.500 | 8.250 -> 8.250 | 0.125 -> 0.125 |" in card
    assert "Hidden-state manifold" not in model_card("m", {}, SUMMARY, after)
