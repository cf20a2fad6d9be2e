"""Targeted refinement: objective weights from the target's token class / frequency bucket."""

import numpy as np
import pytest

from hf_mrp.errors import MRPUserError
from hf_mrp.ops.targeting import objective_weights
from hf_mrp.research.refine import RefineArguments, training_dataset

TEXTS = {0: " ,", 1: " the", 2: " Paris", 3: " running", 4: "ing", 5: " 1984", 6: " café"}


def decode(token_id: int) -> str:
    return TEXTS[token_id]


IDS = np.array([[0, 1, 2, 3, 0, 1], [3, 4, 5, 0, 6, 1]])  # counts: 0 x3, 1 x3, 3 x2, 2/4/5/6 x1


def test_class_targets_weigh_content_and_entity_tokens_only():
    weights = objective_weights(IDS, decode, classes=["content", "entity"])
    # content: " running", "ing" (a word piece is a content word); entity: " Paris"
    expected = np.isin(IDS, [2, 3, 4]).astype(np.float32)
    np.testing.assert_array_equal(weights, expected)
    assert weights.dtype == np.float32 and weights.shape == IDS.shape


def test_buckets_and_classes_combine_by_and_and_untargeted_weight():
    np.testing.assert_array_equal(objective_weights(IDS, decode, buckets=["2-4"]), np.isin(IDS, [0, 1, 3]))
    both = objective_weights(IDS, decode, classes=["content"], buckets=["2-4"])  # content AND counted 2-4
    np.testing.assert_array_equal(both, (IDS == 3).astype(np.float32))
    soft = objective_weights(IDS, decode, classes=["structural"], untargeted_weight=0.25)
    np.testing.assert_array_equal(soft, np.where(IDS == 0, 1.0, 0.25).astype(np.float32))
    np.testing.assert_array_equal(objective_weights(IDS, decode), np.ones(IDS.shape, np.float32))


def test_bad_targets_are_one_line_user_errors():
    with pytest.raises(MRPUserError, match="unknown token class 'nouns'; choose from structural"):
        RefineArguments(mrp_target_classes=["nouns"])
    with pytest.raises(MRPUserError, match="unknown token bucket '3-4'"):
        RefineArguments(mrp_target_buckets=["3-4"])
    with pytest.raises(MRPUserError, match="mrp_untargeted_weight"):
        RefineArguments(mrp_untargeted_weight=2.0)
    assert RefineArguments(mrp_target_classes=["content"]).targeted and not RefineArguments().targeted


def test_weights_travel_as_the_mrp_weights_column():
    weights = objective_weights(IDS, decode, classes=["entity"])
    dataset = training_dataset(IDS, weights)
    assert dataset.column_names == ["input_ids", "labels", "mrp_weights"]
    assert dataset[0]["mrp_weights"] == weights[0].tolist()
    assert training_dataset(IDS).column_names == ["input_ids", "labels"]


def test_refine_flags_parse():
    from hf_mrp.research.commands.refine import parse_arguments

    refine_args = parse_arguments(
        ["--mrp_target_classes", "content", "entity", "--mrp_target_buckets", "100+", "--train_lm_head", "true"]
    )[2]
    assert refine_args.mrp_target_classes == ["content", "entity"] and refine_args.mrp_target_buckets == ["100+"]
    assert refine_args.train_lm_head and parse_arguments([])[2].mrp_target_classes is None


def test_head_peft_config_adds_the_head_and_needs_lora():
    from hf_mrp.research.refine import head_peft_config
    from hf_mrp.training import MRPConfig

    from helpers import tiny_llama

    model = tiny_llama()
    config = MRPConfig(output_dir="unused", lora_layers="1-2", use_cpu=True, report_to="none")
    peft_config = head_peft_config(model, config)
    assert peft_config.modules_to_save == ["lm_head"] and peft_config.layers_to_transform == [1, 2]
    with pytest.raises(MRPUserError, match="drop --train_lm_head"):
        head_peft_config(model, MRPConfig(output_dir="unused", use_lora=False, use_cpu=True, report_to="none"))


def test_inverse_frequency_weights_are_one_over_the_count_with_mean_one_over_targets():
    from hf_mrp.ops.targeting import inverse_frequency_weights

    weights = inverse_frequency_weights(IDS)
    counts = {0: 3, 1: 3, 2: 1, 3: 2, 4: 1, 5: 1, 6: 1}  # counted by hand from IDS
    raw = np.vectorize(lambda token: 1.0 / counts[token])(IDS)
    expected = raw / raw[:, 1:].mean()  # targets: every token but each block's first
    np.testing.assert_allclose(weights, expected, rtol=2**-23)  # float64 math rounded once to float32
    assert weights.dtype == np.float32 and abs(float(weights[:, 1:].astype(np.float64).mean()) - 1.0) < 1e-6


def test_weighting_multiplies_the_targeting_weights(tmp_path):
    from hf_mrp.ops.targeting import inverse_frequency_weights
    from hf_mrp.research.refine_inputs import target_weights

    class Tokenizer:  # what decoder_from_tokenizer reads
        def decode(self, ids, **kwargs):
            return "".join(TEXTS[int(i)] for i in ids)

    both = RefineArguments(mrp_target_classes=["content"], mrp_weighting="inverse_frequency")
    weights = target_weights(IDS, Tokenizer(), both)
    targeting = objective_weights(IDS, decode, classes=["content"])
    np.testing.assert_array_equal(weights, targeting * inverse_frequency_weights(IDS))
    alone = target_weights(IDS, Tokenizer(), RefineArguments(mrp_weighting="inverse_frequency"))
    np.testing.assert_array_equal(alone, inverse_frequency_weights(IDS))
    assert target_weights(IDS, Tokenizer(), RefineArguments()) is None
    with pytest.raises(MRPUserError, match="mrp_weighting must be one of none, inverse_frequency, got 'idf'"):
        RefineArguments(mrp_weighting="idf")
