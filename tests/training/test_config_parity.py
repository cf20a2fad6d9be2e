"""One validation path: MRPConfig and MRPSFTConfig refuse exactly the same MRP settings with the same line."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("trl")

from hf_mrp.errors import MRPUserError  # noqa: E402
from hf_mrp.ops import MRPSettings  # noqa: E402
from hf_mrp.training import MRPConfig  # noqa: E402
from hf_mrp.training.config import MRPArguments  # noqa: E402
from hf_mrp.training.sft import MRPSFTConfig  # noqa: E402

BAD_VALUES = {  # every MRP field -> values no run can use
    "mrp_objective": ["marg", 3, None],
    "mrp_lambda": [-1.0, float("inf"), float("nan"), "0.5", True],
    "mrp_margin_threshold": [0.0, -1.0, float("inf"), "1"],
    "mrp_margin_normalization": ["mean", None],
    "mrp_top_k": [1, 2.5, True, 10**6],
    "mrp_chunk_size": [0, 1.5],
    "mrp_logits_precision": ["fp8", None],
    "mrp_ce_weight": [-1.0, float("inf"), "1", None],
    "mrp_depth_objective": ["entropy", "depth", "nope", None],
    "mrp_target_layers": ["a,b", "", "3-", "-1", None],
    "mrp_depth_lens": ["fisheye", "tuned", None],
    "mrp_depth_lens_path": [3],
    "mrp_ewc_lambda": [-1.0, float("inf"), float("nan"), "1"],
    "mrp_ewc_batches": [0, 1.5],
}
EWC_FIELDS = {"mrp_ewc_lambda", "mrp_ewc_batches"}  # a term the trainers add (training/ewc.py), not a loss setting
SHARED = {"label_smoothing_factor": [-0.1, 1.5, float("nan")]}  # a TrainingArguments field the fused CE honours
CASES = [(name, value) for name, values in {**BAD_VALUES, **SHARED}.items() for value in values]


def test_every_mrp_field_has_bad_values_here():
    assert {field.name for field in dataclasses.fields(MRPArguments)} == set(BAD_VALUES)


def refusal(config_class, tmp_path, **settings) -> str:
    with pytest.raises(MRPUserError) as error:
        config_class(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=False, **settings)
    return str(error.value)


@pytest.mark.parametrize("name, value", CASES, ids=[f"{name}={value!r}" for name, value in CASES])
def test_both_configs_refuse_the_same_settings_with_the_same_line(tmp_path, name, value):
    line = refusal(MRPConfig, tmp_path, **{name: value})
    assert line == refusal(MRPSFTConfig, tmp_path, **{name: value})
    assert name.removeprefix("mrp_").split("_")[0] in line and "\n" not in line, line


@pytest.mark.parametrize("config_class", [MRPConfig, MRPSFTConfig])
def test_configs_build_one_checked_settings_object_and_rebuild_it_when_a_field_changes(tmp_path, config_class):
    config = config_class(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        bf16=False,
        mrp_objective="margin",
        mrp_lambda=1,
        mrp_margin_threshold=0.5,
        mrp_top_k=3,
        mrp_chunk_size=64,
        mrp_margin_normalization="valid",
        label_smoothing_factor=0.1,
    )
    assert config.mrp_settings == MRPSettings("margin", 1.0, 0.5, 3, 64, "valid", 0.1, "float32", 1.0)
    assert isinstance(config.mrp_settings.lam, float)
    config.mrp_lambda = 0.25
    assert config.mrp_settings.lam == 0.25
    with pytest.raises(MRPUserError, match="mrp_lambda must be >= 0"):
        config.mrp_lambda = -1.0
    assert "mrp_settings" not in config.to_dict()  # the saved config holds its fields, not the derived object


def test_settings_defaults_are_the_configs_defaults():
    defaults = MRPSettings()
    fields = {field.name: field.default for field in dataclasses.fields(MRPArguments)}
    assert (
        (
            fields["mrp_objective"],
            fields["mrp_lambda"],
            fields["mrp_margin_threshold"],
            fields["mrp_top_k"],
            fields["mrp_chunk_size"],
            fields["mrp_margin_normalization"],
            fields["mrp_logits_precision"],
            fields["mrp_ce_weight"],
        )
        == ("fisher", 0.6, 1.0, 5, 1024, "gated", "float32", 1.0)
        == (
            defaults.objective,
            defaults.lam,
            defaults.tau,
            defaults.top_k,
            defaults.chunk_size,
            defaults.normalization,
            defaults.precision,
            defaults.ce_weight,
        )
    )


def test_every_settings_field_is_one_config_field_with_help():
    """A loss setting is defined once (MRPSettings): each field becomes the configs' field of that name, with its
    default and help, and the settings are built back from exactly those fields."""
    made = {field.name: field for field in dataclasses.fields(MRPArguments)}
    for item in dataclasses.fields(MRPSettings):
        name = item.metadata["config"]
        if name == "label_smoothing_factor":  # TrainingArguments' own field
            continue
        assert made[name].default == item.default and made[name].metadata["help"] == item.metadata["help"], name
    assert set(made) - EWC_FIELDS == {item.metadata["config"] for item in dataclasses.fields(MRPSettings)} - {
        "label_smoothing_factor"
    }


@pytest.mark.parametrize("config_class", [MRPConfig, MRPSFTConfig])
def test_both_configs_take_an_objective_registered_after_import(tmp_path, config_class, monkeypatch):
    """The choices are the registry's when the config is checked, not when hf_mrp was imported."""
    from hf_mrp import register_objective
    from hf_mrp.ops.objectives import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=False)
    with pytest.raises(MRPUserError, match="unknown mrp_objective 'mine'; choose one of margin, fisher"):
        config_class(mrp_objective="mine", **common)
    register_objective("mine", lambda top: -top.values[:, 0], top_k=2)
    assert config_class(mrp_objective="mine", **common).mrp_settings.record.name == "mine"
