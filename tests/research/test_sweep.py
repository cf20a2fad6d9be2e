"""`hf-mrp sweep` on a tiny model: one command, one shared baseline, controls, resume, results."""

import json

import numpy as np
import pytest

from hf_mrp.audit.compare import compare_audits, decoder_from_tokenizer
from hf_mrp.audit.geometry import load_audit
from hf_mrp.errors import MRPUserError
from hf_mrp.models import load_tokenizer
from hf_mrp.research import cli
from hf_mrp.research.commands.sweep import parse_arguments as parse_sweep_arguments
from hf_mrp.research.sweep import SweepArguments, plan_runs
from hf_mrp.research.sweep.metrics import METRIC_KEYS
from hf_mrp.research.sweep.run_statistics import row_means, with_attributable
from hf_mrp.stats.token_classes import CLASSES

# Tolerances: every pytest.approx here compares float64 arithmetic on the same numbers in another order (the sweep's
# numbers against the flip audit's, from the same columns): within n 2^-53 of them (n < 1000: 1e-13); pytest.approx's
# default (rel 1e-6) is nowhere near that limit on any machine.


def sweep_argv(model_dir, out, *extra):
    return [
        "sweep",
        "--model",
        str(model_dir),
        "--output_dir",
        str(out),
        "--objectives",
        "margin",
        "--lambdas",
        "1",
        "--seeds",
        "0",
        "--n_bootstrap",
        "200",
        "--block_size",
        "32",
        "--max_positions",
        "248",
        "--audit_positions",
        "62",
        "--max_steps",
        "3",
        "--learning_rate",
        "0.05",
        "--use_lora",
        "false",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
        *extra,
    ]


def mtimes(folder):
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def flip_numbers_from_positions(sweep_dir, run_dir, tokenizer) -> dict:
    """Every per-run flip number of results.json, computed by `hf-mrp compare`'s own function from the baseline's
    and the run's positions.parquet (with the blocks and the tokenizer, for the frequency buckets and classes)."""
    before, after = load_audit(sweep_dir / "baseline"), load_audit(run_dir / "audit_after")
    comparison = compare_audits(before, after, decoder_from_tokenizer(tokenizer))
    numbers = {
        key: comparison[key]
        for key in ("w2r", "r2w", "net", "flip_ratio", "churn", "median_margin_change", "head_share")
    }
    numbers.update(
        median_margin=comparison["median_margin_after"],
        accuracy=comparison["accuracy_after"],
        structural_share=comparison["by_class"]["structural"]["share_of_net"],
        **{f"net_{label}": comparison["by_class"][label]["net"] for label in CLASSES},
    )
    return numbers


def test_sweep_runs_controls_shares_the_baseline_and_resumes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = sweep_argv(tiny_model_dir, out)
    assert cli.main(argv) == 0, capsys.readouterr().err
    first = capsys.readouterr().out
    assert "baseline: auditing 62 positions" in first and "training control_lam0_seed0" in first

    for name in (
        "results.json",
        "results.md",
        "flips_vs_lambda.png",
        "margin_change_vs_lambda.png",
        "class_net_vs_lambda.png",
        "sweep_settings.json",
        "baseline/audit.json",
    ):
        assert (out / name).is_file(), name
    runs = {p.name for p in (out / "runs").iterdir()}
    assert runs == {"control_lam0_seed0", "margin_lam1_seed0"}
    # one baseline for all: no run audited its own, and it predates every run's comparison
    baseline_time = (out / "baseline" / "audit.json").stat().st_mtime_ns
    for name in runs:
        assert not (out / "runs" / name / "audit_before").exists()
        assert (out / "runs" / name / "comparison" / "flip_audit.json").stat().st_mtime_ns > baseline_time
    control_args = json.loads((out / "runs" / "control_lam0_seed0" / "mrp_config.json").read_text())
    run_args = json.loads((out / "runs" / "margin_lam1_seed0" / "mrp_config.json").read_text())
    assert control_args["mrp_lambda"] == 0.0 and run_args["mrp_lambda"] == 1.0 and run_args["mrp_objective"] == "margin"
    assert {
        k: v
        for k, v in control_args.items()
        if k not in ("mrp_lambda", "mrp_objective", "output_dir", "logging_dir", "run_name")
    } == {
        k: v
        for k, v in run_args.items()
        if k not in ("mrp_lambda", "mrp_objective", "output_dir", "logging_dir", "run_name")
    }

    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "hf-mrp sweep " + " ".join(argv[1:])
    assert results["positions"]["n"] == 62 and results["positions"]["holdout"] is True
    assert results["training"]["max_steps"] == 3 and results["seeds"] == [0]
    by_name = {run["name"]: run for run in results["runs"]}
    control, run = by_name["control_lam0_seed0"], by_name["margin_lam1_seed0"]
    assert run["steps"] == 3 and control["steps"] == 3
    # per-run numbers recomputed from the positions equal the run's own flip audit
    for entry in (control, run):
        flip_audit = json.loads((out / entry["dir"] / "comparison" / "flip_audit.json").read_text())
        for key in ("w2r", "r2w", "net", "churn", "median_margin_change", "head_share"):
            assert entry["metrics"][key] == pytest.approx(flip_audit[key], nan_ok=True), key
        assert entry["metrics"]["structural_share"] == pytest.approx(
            flip_audit["by_class"]["structural"]["share_of_net"], nan_ok=True
        )
        assert sum(entry["metrics"][f"net_{c}"] for c in flip_audit["by_class"]) == flip_audit["net"]
    # every flip number of each run equals what compare's function makes of the two positions files
    tokenizer = load_tokenizer(str(tiny_model_dir))
    for entry in (control, run):
        expected = flip_numbers_from_positions(out, out / entry["dir"], tokenizer)
        assert {key: entry["metrics"][key] for key in expected} == expected, entry["name"]
    assert run["metrics"]["net_attributable"] == run["metrics"]["net"] - control["metrics"]["net"]
    assert control["metrics"]["net_attributable"] is None

    rows = {(row["objective"], row["lambda"]): row for row in results["rows"]}
    assert set(rows) == {("control", 0.0), ("margin", 1.0)}
    margin_row = rows[("margin", 1.0)]["metrics"]
    assert margin_row["net_attributable"]["mean"] == run["metrics"]["net_attributable"]
    assert rows[("control", 0.0)]["metrics"]["net_attributable"] is None
    w2r = margin_row["w2r"]
    assert w2r["mean"] == run["metrics"]["w2r"] and w2r["min"] == w2r["max"] == w2r["mean"] and w2r["std"] is None
    low, high = w2r["ci"]
    assert low <= high and w2r["per_seed"] == {"0": run["metrics"]["w2r"]}
    # the tiny setting is not degenerate: training (full weights, a large learning rate) flips predictions
    assert control["metrics"]["w2r"] + control["metrics"]["r2w"] + run["metrics"]["w2r"] + run["metrics"]["r2w"] > 0

    report = (out / "results.md").read_text()
    assert "held out from training" in report and "hf-mrp sweep --model" in report
    assert "control (CE only)" in report and "net attributable" in report and "62" in report
    assert "flips_vs_lambda.png" in report

    # the same command again: nothing is retrained, the baseline is not touched
    before = mtimes(out / "runs") | {"baseline": baseline_time}
    assert cli.main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("skipping finished run") == 2 and "training " not in second
    assert "baseline: reusing" in second
    assert mtimes(out / "runs") | {"baseline": (out / "baseline" / "audit.json").stat().st_mtime_ns} == before
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]

    # an unfinished run (no training_log.json, which refine writes last) is redone; the finished one is kept
    run_dir = out / "runs" / "margin_lam1_seed0"
    (run_dir / "training_log.json").unlink()
    (run_dir / "leftover.txt").write_text("partial")
    control_files = mtimes(out / "runs" / "control_lam0_seed0")
    assert cli.main(argv) == 0
    third = capsys.readouterr().out
    assert "redoing unfinished run margin_lam1_seed0" in third and third.count("skipping finished run") == 1
    assert not (run_dir / "leftover.txt").exists() and (run_dir / "training_log.json").is_file()
    assert mtimes(out / "runs" / "control_lam0_seed0") == control_files

    # other run settings in the same folder are refused (they would mix incomparable runs)
    assert cli.main(argv[:-2] + ["--max_steps", "4", "--disable_tqdm", "true"]) == 2
    assert "other run settings (max_steps: 3 -> 4)" in capsys.readouterr().err


def test_plan_names_and_reserved_flags():
    args, rest = parse_sweep_arguments(
        [
            "--objectives",
            "fisher",
            "margin",
            "--lambdas",
            "0.3",
            "1.0",
            "0",
            "--seeds",
            "2",
            "--max_steps",
            "5",
            "--block_size",
            "64",
        ]
    )
    assert rest == ["--max_steps", "5", "--block_size", "64"] and args.lambdas == [0.3, 1.0]
    names = [spec.name for spec in plan_runs(args)]
    assert names == [
        "control_lam0_seed2",
        "fisher_lam0.3_seed2",
        "fisher_lam1_seed2",
        "margin_lam0.3_seed2",
        "margin_lam1_seed2",
    ]
    assert [spec.train_objective for spec in plan_runs(args)][0] == "fisher"
    for flag in ("--seed", "--mrp_lambda=0.1", "--mrp_objective", "--push_to_hub"):
        with pytest.raises(MRPUserError, match="set by the sweep"):
            parse_sweep_arguments([flag, "1"])
    with pytest.raises(MRPUserError, match="unknown objective"):
        SweepArguments(objectives=["nope"])


def test_attributable_and_row_means_pair_runs_with_their_controls():
    net = METRIC_KEYS.index("net")
    table = np.zeros((2, 4, len(METRIC_KEYS) - 1))  # [resamples, runs, per-run metrics]
    table[:, :, net] = [[10, 15, 4, 9], [11, 14, 5, 7]]  # runs: control s0, run s0, control s1, run s1
    full = with_attributable(table, np.array([-1, 0, -1, 2]))
    np.testing.assert_array_equal(full[..., -1], [[np.nan, 5, np.nan, 5], [np.nan, 3, np.nan, 2]])
    rows = row_means(full, [[0, 2], [1, 3]])
    np.testing.assert_array_equal(rows[..., net], [[7, 12], [8, 10.5]])
    np.testing.assert_array_equal(rows[..., -1], [[np.nan, 5], [np.nan, 2.5]])
