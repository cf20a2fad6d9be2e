"""`hf-mrp sweep` rows that separate geometry from sharpening: entropy matched to Fisher, W trainable with its
own control, targeted refinement; paired block-bootstrap intervals against the control and t intervals over seeds."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from hf_mrp.errors import MRPUserError
from hf_mrp.research import cli
from hf_mrp.research.commands.sweep import parse_arguments as parse_sweep_arguments
from hf_mrp.research.commands.sweep import parse_pass_through
from hf_mrp.research.sweep import SweepArguments, plan_runs
from hf_mrp.research.sweep.paired import match_entropy
from hf_mrp.research.sweep.plan import variant_fields
from hf_mrp.research.sweep.results import MetricSummary, Row

# Tolerances: every pytest.approx here compares float64 arithmetic on the same numbers in another order (means over
# seeds, paired differences and quantiles of a few numbers): within n 2^-53 of them (n < 100: 1e-14); pytest.approx's
# default (rel 1e-6) is nowhere near that limit on any machine.


def test_plan_has_entropy_grid_head_rows_with_their_controls_and_targeted_rows():
    args, _ = parse_sweep_arguments(
        [
            "--objectives",
            "fisher",
            "entropy",
            "--lambdas",
            "0.5",
            "--entropy_lambdas",
            "0.1",
            "1",
            "--seeds",
            "3",
            "--head_lambdas",
            "0.5",
            "--target_lambdas",
            "0.5",
        ]
    )
    plan = {spec.name: spec for spec in plan_runs(args)}
    assert list(plan) == [
        "control_lam0_seed3",
        "control_head_lam0_seed3",
        "fisher_lam0.5_seed3",
        "entropy_lam0.1_seed3",
        "entropy_lam1_seed3",
        "fisher_head_lam0.5_seed3",
        "fisher_target_lam0.5_seed3",
    ]
    settings = {name: variant_fields(args, spec.variant) for name, spec in plan.items()}
    assert settings["control_head_lam0_seed3"] == settings["fisher_head_lam0.5_seed3"] == {"train_lm_head": True}
    assert settings["fisher_target_lam0.5_seed3"] == {"mrp_target_classes": ["content", "entity"]}
    assert settings["control_lam0_seed3"] == settings["fisher_lam0.5_seed3"] == {}
    for flag in ("--train_lm_head", "--mrp_target_classes"):
        with pytest.raises(MRPUserError, match="set by the sweep"):
            parse_sweep_arguments([flag, "true"])
    with pytest.raises(MRPUserError, match="unknown token class"):
        SweepArguments(target_classes=["nouns"], target_lambdas=[1.0])


def test_audit_blocks_default_to_64_whole_blocks_unless_positions_are_given():
    assert parse_pass_through(["--block_size", "32"], 64).refine.audit_positions == 64 * 31
    assert parse_pass_through([], 64).refine.audit_positions == 64 * 255  # the refine default block size, 256
    assert parse_pass_through(["--audit_positions=100"], 64).refine.audit_positions == 100
    assert parse_pass_through(["--audit_positions", "100", "--block_size", "32"], 64).refine.audit_positions == 100


def test_match_entropy_picks_the_closest_median_margin_change():
    def row(objective, lam, change, variant=""):
        change_entry = MetricSummary(mean=change, std=None, min=change, max=change, ci=None, per_seed={"0": change})
        metrics = {"median_margin_change": change_entry}
        return Row(objective, lam, variant, objective == "control", objective, [0], ["run"], metrics, None)

    rows = [
        row("control", 0.0, 0.01),
        row("fisher", 0.3, 0.10),
        row("fisher", 1.0, 0.30),
        row("entropy", 0.1, 0.05),
        row("entropy", 0.5, 0.12),
        row("entropy", 2.0, 0.28),
        row("fisher", 1.0, 0.11, "head"),
    ]
    matches = match_entropy(rows)
    assert [(m.reference_lambda, m.entropy_lambda) for m in matches] == [(0.3, 0.5), (1.0, 2.0)]
    assert matches[1].gap == pytest.approx(-0.02) and matches[1].to_json()["reference_value"] == 0.30
    assert match_entropy(rows[:3]) == []


def test_variant_sweep_end_to_end(ray_cluster, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "--model",
        str(tiny_model_dir),
        "--output_dir",
        str(out),
        "--objectives",
        "fisher",
        "entropy",
        "--lambdas",
        "1",
        "--entropy_lambdas",
        "4",
        "--seeds",
        "0",
        "1",
        "--head_lambdas",
        "1",
        "--target_lambdas",
        "1",
        "--n_bootstrap",
        "100",
        "--block_size",
        "32",
        "--max_positions",
        "248",
        "--audit_blocks",
        "3",
        "--max_steps",
        "2",
        "--learning_rate",
        "0.05",
        "--lora_layers",
        "2",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["positions"]["n"] == 3 * 31 and results["positions"]["n_blocks"] == 3
    assert "block" in results["bootstrap"]["method"]
    runs = {run["name"]: run for run in results["runs"]}
    assert len(runs) == 12 and not results["missing_runs"]
    for seed in (0, 1):
        head_args = json.loads((out / "runs" / f"fisher_head_lam1_seed{seed}" / "adapter_config.json").read_text())
        assert head_args["modules_to_save"] == ["lm_head"]
        assert json.loads((out / "runs" / f"control_head_lam0_seed{seed}" / "adapter_config.json").read_text())[
            "modules_to_save"
        ] == ["lm_head"]
        assert runs[f"fisher_head_lam1_seed{seed}"]["control_run"] == f"control_head_lam0_seed{seed}"
        assert runs[f"fisher_target_lam1_seed{seed}"]["control_run"] == f"control_lam0_seed{seed}"
        saved = load_file(out / "runs" / f"fisher_head_lam1_seed{seed}" / "adapter_model.safetensors")
        base = load_file(tiny_model_dir / "model.safetensors")
        assert (saved["base_model.model.lm_head.weight"] - base["lm_head.weight"]).abs().max() > 0  # W trained
        targeted = json.loads((out / "runs" / f"fisher_target_lam1_seed{seed}" / "run_arguments.json").read_text())
        assert targeted["arguments"]["mrp_target_classes"] == ["content", "entity"]

    rows = {(row["objective"], row["lambda"], row["variant"]): row for row in results["rows"]}
    assert set(rows) == {
        ("control", 0.0, ""),
        ("control", 0.0, "head"),
        ("fisher", 1.0, ""),
        ("entropy", 4.0, ""),
        ("fisher", 1.0, "head"),
        ("fisher", 1.0, "target"),
    }
    assert rows[("control", 0.0, "")]["vs_control"] is None
    for (objective, _lam, _variant), row in rows.items():
        if objective == "control":
            continue
        for key in ("net", "w2r", "accuracy", "median_margin_change", "net_content", "net_entity"):
            entry = row["vs_control"][key]
            per_seed = {}
            for seed in (0, 1):
                run = runs[row["runs"][row["seeds"].index(seed)]]
                per_seed[str(seed)] = run["metrics"][key] - runs[run["control_run"]]["metrics"][key]
            assert entry["per_seed"] == pytest.approx(per_seed), (row["label"], key)
            assert entry["mean"] == pytest.approx(np.mean(list(per_seed.values())))
            low, high = entry["seed_ci"]  # t interval over 2 seeds: symmetric around the mean
            assert low <= entry["mean"] <= high and (high - entry["mean"]) == pytest.approx(entry["mean"] - low)
            assert entry["ci"] is None or entry["ci"][0] <= entry["ci"][1]
        assert row["vs_control"]["net"]["mean"] == pytest.approx(row["metrics"]["net_attributable"]["mean"])
    matched = results["entropy_matched"]
    assert len(matched) == 1 and matched[0]["reference_lambda"] == 1.0
    assert matched[0]["entropy_lambda"] == 4.0  # the only entropy lambda (the choice is tested above)
    difference = matched[0]["fisher_minus_entropy"]["net"]
    fisher = [runs[f"fisher_lam1_seed{s}"]["metrics"]["net"] for s in (0, 1)]
    entropy = [runs[f"entropy_lam{matched[0]['entropy_lambda']:g}_seed{s}"]["metrics"]["net"] for s in (0, 1)]
    assert difference["mean"] == pytest.approx(np.mean(np.subtract(fisher, entropy)))

    report = (out / "results.md").read_text()
    for text in (
        "Against the control (paired)",
        "Attributable net by token class",
        "Geometry or sharpening",
        "fisher (W trainable)",
        "control (CE only, W trainable)",
        "fisher (targeted: content, entity)",
        "block-bootstrap",
    ):
        assert text in report, text


def test_paired_difference_by_hand():
    from hf_mrp.research.sweep.paired import paired_difference

    rng = np.random.default_rng(0)
    point = np.array([[10.0, 0.5], [14.0, 0.6], [9.0, 0.4], [15.0, 0.7]])  # control s0, run s0, control s1, run s1
    samples = point + rng.normal(0, 1, (200, 4, 2))
    result = paired_difference(point, samples, [(1, 0), (3, 2)], ("net", "accuracy"), (0, 1), 0.9)
    net = result["net"]
    assert net.per_seed == {"0": 4.0, "1": 6.0} and net.mean == 5.0
    by_hand = ((samples[:, 1, 0] - samples[:, 0, 0]) + (samples[:, 3, 0] - samples[:, 2, 0])) / 2
    assert net.ci == pytest.approx(list(np.quantile(by_hand, [0.05, 0.95])))
    half = 6.313751514675043 * np.std([4.0, 6.0], ddof=1) / np.sqrt(2)  # t_{1, 0.95}
    assert net.seed_ci == pytest.approx([5 - half, 5 + half])
    same = paired_difference(point, samples, [(1, 1), (3, 3)], ("net", "accuracy"), (0, 1), 0.9)
    assert same["net"].ci == [0.0, 0.0] and same["accuracy"].seed_ci == [0.0, 0.0]
    assert paired_difference(point, None, [(1, 0)], ("net", "accuracy"), (0,), 0.9)["net"].to_json() == {
        "mean": 4.0,
        "per_seed": {"0": 4.0},
        "ci": None,
        "seed_ci": None,
    }
