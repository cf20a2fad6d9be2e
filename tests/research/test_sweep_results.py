"""results.json's records: the one to_json writes results.json's keys, in results.json's order, ``lam`` as "lambda",
the head and the aggregate merged into the top level, nested records, lists and dicts of records all written."""

import json

from hf_mrp.research.sweep.results import (
    Aggregate,
    BaselineNumbers,
    Bootstrap,
    ControlSettings,
    EntropyMatch,
    FailedRun,
    FlipHeadline,
    MetricSummary,
    PairedDifference,
    Positions,
    Row,
    RunEntry,
    SweepHead,
    SweepResults,
    Training,
)

# results.json's keys as the sweep has written them since failed_runs came (docs/experiments.md)
TOP_KEYS = [
    "command",
    "objectives",
    "lambdas",
    "seeds",
    "control",
    "positions",
    "training",
    "bootstrap",
    "variants",
    "entropy_lambdas",
    "objective_lambdas",
    "spread",
    "metrics",
    "executed_now",
    "engine",
    "rows",
    "entropy_matched",
    "runs",
    "missing_runs",
    "failed_runs",
    "baseline",
    "plots",
]
ROW_KEYS = ["objective", "lambda", "variant", "control", "label", "seeds", "runs", "metrics", "vs_control"]
RUN_KEYS = ["name", "objective", "train_objective", "lambda", "seed", "control", "dir", "steps", "seconds", "variant"]
RUN_KEYS += ["settings", "control_run", "metrics", "flip_audit"]


def small_results() -> SweepResults:
    summary = MetricSummary(mean=3.0, std=1.0, min=2.0, max=4.0, ci=[1.5, 4.5], per_seed={"0": 2.0, "1": 4.0})
    paired = {"net": PairedDifference(mean=1.0, per_seed={"0": 0.5, "1": 1.5}, ci=None, seed_ci=[-5.4, 7.4])}
    row = Row("fisher", 0.3, "", False, "fisher", [0, 1], ["fisher_lam0.3_seed0"], {"net": summary}, paired)
    headline = FlipHeadline.from_flip_audit({"w2r": 5, "r2w": 2, "net": 3, "churn": 0.1, "extra": "ignored"})
    run = RunEntry(
        name="fisher_lam0.3_seed0",
        objective="fisher",
        train_objective="fisher",
        lam=0.3,
        seed=0,
        control=False,
        dir="runs/fisher_lam0.3_seed0",
        steps=60,
        seconds=12.5,
        variant="",
        settings={},
        control_run="control_lam0_seed0",
        metrics={"net": 3.0},
        flip_audit=headline,
    )
    match = EntropyMatch("fisher", 0.3, 0.1, 0.2, 0.12, 0.02, "median_margin_change", paired)
    head = SweepHead(
        command="hf-mrp sweep",
        objectives=["fisher"],
        lambdas=[0.3],
        seeds=[0, 1],
        control=ControlSettings(objective="fisher", lam=0.0, runs=["control_lam0_seed0"], note="CE only"),
        positions=Positions(62, True, True, 32, 2, "ab" * 32, "text"),
        training=Training(60, 3.0, 4, 1, 2e-4, 32, 124, True, 16, "1-2", "gated"),
        bootstrap=Bootstrap(100, 0.95, 0, "block", "paired"),
        variants={"head": {"settings": {"train_lm_head": True}}},
        entropy_lambdas=None,
        objective_lambdas={},
        spread="over seeds",
        metrics={"net": {"header": "net", "description": "W->R - R->W"}},
    )
    baseline = BaselineNumbers("baseline", 62, 0.4, 1.0, 0.3, 0.7, 0.99, "ab" * 32, "tiny")
    aggregate = Aggregate([row], [match], [run], [], [FailedRun("margin_lam1_seed0", "diverged")], baseline)
    engine = {"name": "ray", "version": "2.60.0", "address": "local"}
    return SweepResults(
        head=head, executed_now=["fisher_lam0.3_seed0"], engine=engine, aggregate=aggregate, plots={"flips": "f.png"}
    )


def test_to_json_writes_results_json_keys_in_order():
    data = small_results().to_json()
    assert list(data) == TOP_KEYS
    assert list(data["rows"][0]) == ROW_KEYS and list(data["runs"][0]) == RUN_KEYS
    assert data["control"] == {"objective": "fisher", "lambda": 0.0, "runs": ["control_lam0_seed0"], "note": "CE only"}
    assert data["rows"][0]["lambda"] == 0.3 and data["runs"][0]["lambda"] == 0.3
    assert data["rows"][0]["metrics"]["net"] == {
        "mean": 3.0,
        "std": 1.0,
        "min": 2.0,
        "max": 4.0,
        "ci": [1.5, 4.5],
        "per_seed": {"0": 2.0, "1": 4.0},
    }
    expected_paired = {"net": {"mean": 1.0, "per_seed": {"0": 0.5, "1": 1.5}, "ci": None, "seed_ci": [-5.4, 7.4]}}
    assert data["rows"][0]["vs_control"] == expected_paired
    assert data["entropy_matched"][0]["fisher_minus_entropy"] == expected_paired
    assert list(data["entropy_matched"][0])[-2:] == ["matched_on", "fisher_minus_entropy"]
    assert data["runs"][0]["flip_audit"] == {
        "w2r": 5,
        "r2w": 2,
        "net": 3,
        "flip_ratio": None,
        "churn": 0.1,
        "median_margin_change": None,
        "head_share": None,
    }
    assert data["failed_runs"] == [{"name": "margin_lam1_seed0", "reason": "diverged"}]
    assert data["engine"] == {"name": "ray", "version": "2.60.0", "address": "local"}
    assert (
        data["positions"]["n"] == 62
        and data["training"]["lora_layers"] == "1-2"
        and data["plots"] == {"flips": "f.png"}
    )
    json.dumps(data)  # plain JSON: no record left unconverted


def test_row_mean_is_none_where_the_metric_is_undefined():
    row = small_results().aggregate.rows[0]
    assert row.mean("net") == 3.0
    row.metrics["net_attributable"] = None
    assert row.mean("net_attributable") is None
