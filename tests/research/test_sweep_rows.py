"""`hf-mrp sweep --variants`: rows with settings of their own, each paired with the control of its settings at lambda
0, or with the main control where those change or train nothing; --objective_lambdas; resuming with an added row."""

import json

import pytest

from hf_mrp.errors import MRPUserError
from hf_mrp.research import cli
from hf_mrp.research.commands.sweep import parse_arguments
from hf_mrp.research.sweep import plan_runs
from hf_mrp.research.sweep.plan import run_fields

# Tolerances: the paired differences are float64 subtractions of the runs' own numbers in results.json, compared
# with the same subtraction here: exact up to one rounding of each (pytest.approx's default rel 1e-6 is far above).


def test_plan_pairs_each_variant_with_its_settings_at_lambda_0_or_the_main_control():
    args, _ = parse_arguments(
        "--objectives fisher margin --lambdas 0.6 --objective_lambdas margin=1 --seeds 2 --head_lambdas 0.6 --variants "
        "ce0:fisher:0.6:mrp_ce_weight=0:max_accuracy_drop=100 ewc:fisher:0.6:mrp_ewc_lambda=1e5:mrp_ewc_batches=2 "
        "k3:proxy:0.3:mrp_top_k=3:mrp_target_classes=content,entity kept:margin:1:max_accuracy_drop=50".split()
    )
    plan = {spec.name: spec for spec in plan_runs(args)}
    assert {name: spec.control_run for name, spec in plan.items()} == {
        "control_lam0_seed2": "",
        "control_head_lam0_seed2": "",
        "control_ewc_lam0_seed2": "",
        "fisher_lam0.6_seed2": "control_lam0_seed2",
        "margin_lam1_seed2": "control_lam0_seed2",  # its own grid
        "fisher_head_lam0.6_seed2": "control_head_lam0_seed2",
        "fisher_ce0_lam0.6_seed2": "control_lam0_seed2",  # at lambda 0 with CE weight 0 nothing trains
        "fisher_ewc_lam0.6_seed2": "control_ewc_lam0_seed2",
        "proxy_k3_lam0.3_seed2": "control_lam0_seed2",  # objective-only settings: nothing changes at lambda 0
        "margin_kept_lam1_seed2": "control_lam0_seed2",  # the verdict's limit changes no training
    }
    fields = {name: run_fields(args, spec) for name, spec in plan.items()}
    assert fields["fisher_ce0_lam0.6_seed2"] == {"mrp_ce_weight": 0.0, "max_accuracy_drop": 100.0}  # typed as flags
    assert fields["margin_kept_lam1_seed2"] == {"max_accuracy_drop": 50.0}
    assert fields["control_ewc_lam0_seed2"] == fields["fisher_ewc_lam0.6_seed2"]
    assert fields["fisher_ewc_lam0.6_seed2"] == {"mrp_ewc_lambda": 1e5, "mrp_ewc_batches": 2}
    assert fields["proxy_k3_lam0.3_seed2"] == {"mrp_top_k": 3, "mrp_target_classes": ["content", "entity"]}
    assert fields["control_lam0_seed2"] == fields["fisher_lam0.6_seed2"] == {}


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("ewc:fisher", "needs a name, an objective and a lambda"),
        ("ewc:fisher:0", "must be a number > 0"),
        ("ewc:fishr:0.6", "unknown objective 'fishr'"),
        ("ewc:fisher:0.6:mrp_ewc_lamda=1", "mrp_ewc_lamda is no field of the runs"),
        ("ewc:fisher:0.6:mrp_ewc_lambda", "is not FIELD=VALUE"),
        ("ewc:fisher:0.6:mrp_ewc_lambda=lots", "could not convert"),
        ("ewc:fisher:0.6:mrp_lambda=2", "set by the sweep"),
        ("e w:fisher:0.6", "letters, digits"),
        ("head:fisher:0.6", "not head or target"),
    ],
)
def test_a_bad_variant_is_refused_in_one_line_that_shows_the_form(spec, problem):
    with pytest.raises(MRPUserError, match=problem) as caught:
        parse_arguments(["--variants", spec])
    assert "\n" not in str(caught.value) and "NAME:OBJECTIVE:LAMBDA[:FIELD=VALUE...]" in str(caught.value)


def test_bad_names_and_grids_are_refused_in_one_line():
    for argv, problem in (
        (["--variants", "a:fisher:1", "a:margin:1"], "each variant needs its own name"),
        (["--objective_lambdas", "proxy=1"], "for an objective of --objectives"),
        (["--objective_lambdas", "margin=x"], "must be numbers"),
        (["--objective_lambdas", "margin=0"], "at least one lambda > 0"),
    ):
        with pytest.raises(MRPUserError, match=problem):
            parse_arguments(argv)


def _sweep(model_dir, out, *variants, capsys=None) -> dict:
    argv = ["sweep", "--model", str(model_dir), "--output_dir", str(out), "--objectives", "fisher", "--lambdas", "1"]
    argv += ["--seeds", "0", "--n_bootstrap", "20", "--block_size", "32", "--max_positions", "248"]
    argv += ["--audit_blocks", "2", "--max_steps", "2", "--learning_rate", "0.05", "--lora_layers", "2"]
    argv += ["--use_cpu", "true", "--disable_tqdm", "true", "--logging_steps", "1", "--variants", *variants]
    code = cli.main(argv)
    if capsys is not None:  # expected to be refused
        return {"code": code, "stderr": capsys.readouterr().err}
    assert code == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_variant_rows_with_their_controls_and_a_resume_that_runs_only_the_added_row(
    ray_cluster, tiny_model_dir, tmp_path, capsys
):
    out = tmp_path / "sweep"
    variants = ["ce0:fisher:1:mrp_ce_weight=0", "ewc:fisher:1:mrp_ewc_lambda=10:mrp_ewc_batches=1"]
    results = _sweep(tiny_model_dir, out, *variants)
    runs = {run["name"]: run for run in results["runs"]}
    assert set(runs) == {
        "control_lam0_seed0",
        "control_ewc_lam0_seed0",
        "fisher_lam1_seed0",
        "fisher_ce0_lam1_seed0",
        "fisher_ewc_lam1_seed0",
    }
    assert runs["fisher_ewc_lam1_seed0"]["settings"] == runs["control_ewc_lam0_seed0"]["settings"]
    assert runs["fisher_ewc_lam1_seed0"]["settings"] == {"mrp_ewc_lambda": 10.0, "mrp_ewc_batches": 1}
    assert runs["fisher_ewc_lam1_seed0"]["control_run"] == "control_ewc_lam0_seed0"
    assert runs["fisher_ce0_lam1_seed0"]["settings"] == {"mrp_ce_weight": 0.0}
    assert runs["fisher_ce0_lam1_seed0"]["control_run"] == "control_lam0_seed0"  # the main control
    control_dir = out / "runs" / "control_ewc_lam0_seed0"
    trained = json.loads((control_dir / "mrp_config.json").read_text())
    assert trained["mrp_ewc_lambda"] == 10.0 and trained["mrp_lambda"] == 0.0
    assert "loss_ewc" in (control_dir / "training_log.json").read_text()  # the control trained with EWC on
    assert (
        results["variants"]["ce0"]["control_settings"] is None
        and "train nothing" in results["variants"]["ce0"]["control"]
    )
    rows = {(row["objective"], row["variant"]): row for row in results["rows"]}
    assert rows[("control", "ewc")]["label"] == "control (CE only, ewc: mrp_ewc_lambda=10, mrp_ewc_batches=1)"
    for variant in ("ce0", "ewc"):
        run = runs[f"fisher_{variant}_lam1_seed0"]
        paired = rows[("fisher", variant)]["vs_control"]["net"]
        assert paired["per_seed"]["0"] == pytest.approx(
            run["metrics"]["net"] - runs[run["control_run"]]["metrics"]["net"]
        )
    report = (out / "results.md").read_text()
    assert "ce0: paired with the plain CE-only control" in report

    added = _sweep(tiny_model_dir, out, *variants, "k3:fisher:1:mrp_top_k=3")  # resume: only the new row trains
    assert added["executed_now"] == ["fisher_k3_lam1_seed0"] and len(added["runs"]) == 6
    capsys.readouterr()
    changed = _sweep(
        tiny_model_dir, out, variants[0], "ewc:fisher:1:mrp_ewc_lambda=20:mrp_ewc_batches=1", capsys=capsys
    )
    assert changed["code"] == 2 and "control_ewc_lam0_seed0 was trained with other settings" in changed["stderr"]
    assert changed["stderr"].count("\n") == 1 and "mrp_ewc_lambda: 10.0 -> 20.0" in changed["stderr"]


def test_a_setting_added_to_hf_mrp_since_a_sweep_began_resumes_at_its_default_and_is_named_otherwise(tmp_path):
    from hf_mrp.research.commands.sweep import parse_pass_through
    from hf_mrp.research.sweep.runs import check_settings, default_settings, record_settings, run_settings

    shared = parse_pass_through(["--max_steps", "2"], audit_blocks=4)
    now, defaults = run_settings(shared), default_settings(shared)
    older = {key: value for key, value in now.items() if key != "mrp_depth_lens"}  # written before the field existed
    record_settings(tmp_path, older, "hf-mrp sweep")
    check_settings(tmp_path, now, defaults)  # the field at its default: the runs trained as before it existed
    changed = {**now, "mrp_depth_lens": "logit"}
    with pytest.raises(MRPUserError, match=r"mrp_depth_lens: \(absent\) -> 'logit'"):
        check_settings(tmp_path, changed, defaults)
    with pytest.raises(MRPUserError, match=r"max_steps: 2 -> 3"):
        check_settings(tmp_path, {**now, "max_steps": 3}, defaults)
