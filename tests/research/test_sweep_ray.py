"""`hf-mrp sweep` on Ray (the session's local Ray of 2 CPUs, conftest.ray_cluster): a four-run grid two runs at a
time equals the same grid run one by one in this process, after its driver was killed (SIGKILL) once a run had
finished and the same command was given again; a diverged run is a FAILED row and exit code 2; a run on two
processes (Ray Train, gloo) equals its one-process run.

One grid serves every case (a sweep costs seconds of process start-up on two cores): control, margin at lambda 1,
margin at lambda 1e38 (its loss overflows float32 at the first step: diverges on any machine) and entropy at
lambda 1, on the tiny model, LoRA on layers 1-2, 3 steps of one batch holding all 8 training blocks (248 positions
and 62 more for the audit: 10 blocks of 31, the first 2 audited), so 2 processes of 4 blocks each
(--per_device_train_batch_size 4 there) see the same rows each step as 1 process of 8."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from hf_mrp.audit.compare import compare_audits, decoder_from_tokenizer
from hf_mrp.audit.geometry import load_audit
from hf_mrp.models import load_tokenizer
from hf_mrp.research import cli
from hf_mrp.research.commands.sweep import parse_arguments, parse_pass_through
from hf_mrp.research.refine import refine
from hf_mrp.research.sweep import plan_runs
from hf_mrp.research.sweep.plan import run_fields, run_name
from hf_mrp.research.sweep.runs import ensure_baseline, execute_run, run_arguments
from hf_mrp.stats.token_classes import CLASSES
from hf_mrp.training.divergence import TrainingDiverged

from helpers import ROOT, assert_same_flips, file_hashes, one_torch_thread, tiny_model_bounds

pytestmark = pytest.mark.slow  # Ray trials and Train workers are processes

DIVERGES = run_name("margin", 1e38, 0)
RUNS = ("control_lam0_seed0", "margin_lam1_seed0")
# Fields of results.json that are not the sweep's numbers: how and when it ran (the command names its folder).
NOT_NUMBERS = {"command", "executed_now", "engine", "seconds"}


def grid_argv(model_dir, out, *extra) -> list[str]:
    return [
        "sweep",
        *("--model", str(model_dir), "--output_dir", str(out)),
        *("--objectives", "margin", "entropy", "--lambdas", "1", "--objective_lambdas", "margin=1,1e38"),
        *("--seeds", "0", "--n_bootstrap", "50", "--max_concurrent_runs", "2"),
        *("--block_size", "32", "--max_positions", "248", "--audit_positions", "62", "--max_steps", "3"),
        *("--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--lora_layers", "1-2"),
        *("--logging_steps", "1", "--use_cpu", "true", "--disable_tqdm", "true", "--report_to", "none"),
        *extra,
    ]


def one_by_one(argv: list[str], out) -> int:
    """The grid's runs one after another in this process (the per-run function each trial calls, refine here), then
    `hf-mrp sweep --aggregate_only` for the results: the reference a sweep on Ray must equal."""
    args, rest = parse_arguments(argv[1:])
    shared = parse_pass_through(rest, args.audit_blocks)
    plan = plan_runs(args)
    arguments = {s.name: run_arguments(shared, s, out / "runs" / s.name, run_fields(args, s)) for s in plan}
    out.mkdir(parents=True)
    with one_torch_thread():  # as each trial runs (Ray gives a 1-CPU actor one thread)
        ensure_baseline(out, arguments[plan[0].name])
        for spec in plan:
            try:
                execute_run(
                    spec, arguments[spec.name], out / "runs" / spec.name, out / "baseline",
                    lambda a: refine(*a, baseline_dir=out / "baseline"),
                )  # fmt: skip
            except TrainingDiverged:
                pass
    return cli.main([*argv, "--aggregate_only", "true"])


def assert_same_numbers(got, want, rel: float, path: str = "") -> None:
    """Every number of ``got`` within ``rel`` of ``want`` (relative, absolute below 1), everything else equal."""
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for key in want:
            if key not in NOT_NUMBERS:
                assert_same_numbers(got[key], want[key], rel, f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for index, (a, b) in enumerate(zip(got, want)):
            assert_same_numbers(a, b, rel, f"{path}[{index}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert abs(got - want) <= rel * max(1.0, abs(want)), (path, got, want)
    else:
        assert got == want, (path, got, want)


def flip_numbers_from_positions(sweep_dir, run_dir, tokenizer) -> dict:
    """Every per-run flip number of results.json, computed by `hf-mrp compare`'s own function from the baseline's
    and the run's positions.parquet (with the blocks and the tokenizer, for the frequency buckets and classes)."""
    before, after = load_audit(sweep_dir / "baseline"), load_audit(run_dir / "audit_after")
    comparison = compare_audits(before, after, decoder_from_tokenizer(tokenizer))
    numbers = {key: comparison[key] for key in ("w2r", "r2w", "net", "flip_ratio", "churn", "median_margin_change")}
    numbers.update(
        head_share=comparison["head_share"],
        median_margin=comparison["median_margin_after"],
        accuracy=comparison["accuracy_after"],
        structural_share=comparison["by_class"]["structural"]["share_of_net"],
        **{f"net_{label}": comparison["by_class"][label]["net"] for label in CLASSES},
    )
    return numbers


def report(folder) -> str:
    """results.md without what tells runs of one grid apart: the folder, each run's seconds (the table of runs)."""
    text = (folder / "results.md").read_text().replace(str(folder), "FOLDER")
    return re.sub(r"^(\| [^|]+ \| \d+ \| \d+ \| )[^|]+ \|", r"\1seconds |", text, flags=re.M)


def kill_after_first_finished(argv: list[str], address: str) -> str:
    """The sweep as its own driver process on the session's Ray, killed (SIGKILL) as soon as it reports a finished
    run: that run's name."""
    env = {**os.environ, "RAY_ADDRESS": address, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(
        [sys.executable, "-m", "hf_mrp.research.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert driver.stdout is not None
    for line in driver.stdout:
        found = re.match(r"\[\d+/4\] finished (\S+) in", line)
        if found:
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=60)
            return found.group(1)
    raise AssertionError(f"the driver ended (exit code {driver.wait()}) without reporting a finished run")


def wait_for_free_cpus(want: float = 2.0, timeout: float = 60.0) -> None:
    """Until the killed driver's trials are gone (Ray ends a dead driver's actors; they hold the CPUs till then)."""
    import ray

    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < want:
        assert time.monotonic() < deadline, "the killed driver's trials still hold CPUs"
        time.sleep(0.5)


def test_ray_sweep_resumes_after_sigkill_and_equals_the_runs_one_by_one(ray_cluster, tiny_model_dir, tmp_path, capsys):
    ray_dir, reference = tmp_path / "ray", tmp_path / "reference"
    argv = grid_argv(tiny_model_dir, ray_dir)
    first = kill_after_first_finished(argv, ray_cluster)
    kept = file_hashes(ray_dir / "runs" / first)
    wait_for_free_cpus()
    assert cli.main(argv) == 2  # the same command again: it resumes, and one run diverged
    captured = capsys.readouterr()
    assert f"skipping finished run {first}" in captured.out and f"training {first} " not in captured.out
    assert file_hashes(ray_dir / "runs" / first) == kept  # the finished run was not trained again
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith(f"hf-mrp sweep: error: 1 of 4 runs failed: {DIVERGES}; results.md lists them"), last
    assert f"FAILED {DIVERGES}: training diverged at step" in captured.out
    got = json.loads((ray_dir / "results.json").read_text())
    assert got["engine"] == {"name": "ray", "version": "2.60.0", "address": ray_cluster}
    assert [run["name"] for run in got["failed_runs"]] == [DIVERGES] and not got["missing_runs"]
    assert "training diverged at step" in got["failed_runs"][0]["reason"]
    assert not (ray_dir / "runs" / DIVERGES / "training_log.json").exists()
    check_runs(ray_dir, got, tiny_model_dir)

    before = file_hashes(ray_dir / "runs")  # once more: all runs finished or failed, nothing trains
    assert cli.main(argv) == 2
    again = capsys.readouterr().out
    assert again.count("skipping finished run") == 3 and "baseline: reusing" in again
    assert not re.search(r"^training ", again, flags=re.M)  # no trial started
    assert (
        file_hashes(ray_dir / "runs") == before
        and json.loads((ray_dir / "results.json").read_text())["executed_now"] == []
    )

    assert one_by_one(grid_argv(tiny_model_dir, reference), reference) == 2
    capsys.readouterr()
    want = json.loads((reference / "results.json").read_text())
    assert len(want["runs"]) == 3 and want["failed_runs"][0]["name"] == DIVERGES
    # The same float32 computation of each run on one thread, in a Ray actor or here: the same bits, so every
    # number of results.json (float64 statistics of identical inputs, in the same order) equal within 1e-12.
    assert_same_numbers(got, want, rel=1e-12)
    assert report(ray_dir) == report(reference).replace(" --aggregate_only true", "")
    assert f"**FAILED (diverged, left out of every row):** {DIVERGES}" in report(ray_dir)
    two_processes_equal_one(tiny_model_dir, reference, tmp_path / "two", capsys)


def check_runs(sweep_dir, results: dict, model_dir) -> None:
    """Each run's folder as `hf-mrp refine` writes it, against the one shared baseline, its numbers those of
    `hf-mrp compare`'s own function, the control trained as its runs but for the objective's weight."""
    tokenizer = load_tokenizer(str(model_dir))
    for entry in results["runs"]:
        run_dir = sweep_dir / entry["dir"]
        assert not (run_dir / "audit_before").exists()  # one shared baseline: no run audited its own
        expected = flip_numbers_from_positions(sweep_dir, run_dir, tokenizer)
        assert {key: entry["metrics"][key] for key in expected} == expected, entry["name"]
    configs = [json.loads((sweep_dir / "runs" / name / "mrp_config.json").read_text()) for name in RUNS]
    own = ("mrp_lambda", "mrp_objective", "output_dir", "logging_dir", "run_name")
    assert [config["mrp_lambda"] for config in configs] == [0.0, 1.0]
    assert {k: v for k, v in configs[0].items() if k not in own} == {
        k: v for k, v in configs[1].items() if k not in own
    }


def two_processes_equal_one(model_dir, reference, two, capsys) -> None:
    """--processes_per_run 2 (two Ray Train workers, DDP over gloo) with 4 blocks a process, in a sweep of its own
    (control and entropy at lambda 1): each run equal to the reference's one-process run of all 8 blocks a step; then
    other run settings in that folder are refused in one line. (With the reference's 8 blocks a process each worker
    would get all 8 blocks: the runs would equal the reference trivially, two copies of one computation, and no split
    of the batch would be tested. Not margin: its default 'gated' normalization is a mean over each process' own
    gated positions, which depends on how the batch is split, as with gradient accumulation: docs/spec.md row 2.)"""
    argv = [
        *grid_argv(model_dir, two, "--processes_per_run", "2", "--cpus_per_run", "2"),
        *("--objectives", "entropy", "--objective_lambdas", "entropy=1", "--per_device_train_batch_size", "4"),
    ]  # later flags win: the grid is the control and entropy 1, 4 blocks a process
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    runs = ("control_lam0_seed0", "entropy_lam1_seed0")
    assert all(f"training {name} " in out for name in runs)
    # Two computations of the same float32 numbers (4 blocks a process against 8 in one, gradients summed across
    # the processes): each within the tiny decoder's bound (V = 49,152, 8 blocks of 32 a step), twice that apart; the
    # later steps follow AdamW updates that move only by lr eps dg / g^2 more (test_distributed's argument).
    bound = 2 * tiny_model_bounds(vocab=49_152, positions=248, length=32)[0]
    for name in runs:
        pair = (two / "runs" / name, reference / "runs" / name)
        logs = [[row for row in json.loads((run / "training_log.json").read_text()) if "loss" in row] for run in pair]
        assert len(logs[0]) == len(logs[1]) == 3
        for a, b in zip(*logs):
            for key in ("loss", "loss_ce", "loss_mrp", "mean_margin"):
                assert abs(a[key] - b[key]) <= bound * max(1.0, abs(b[key])), (name, key, a[key], b[key], bound)
        assert_same_flips(*pair, atol=bound, before=reference / "baseline")

    assert cli.main([*argv, "--max_steps", "4"]) == 2  # other run settings: refused at once
    assert "other run settings (max_steps: 3 -> 4)" in capsys.readouterr().err


def test_the_trial_table_says_a_run_is_auditing_after_its_last_step():
    """After the last step a run audits (minutes at full size) with no step to show: the end of the last step is
    reported, and the table says the run is auditing instead of holding 'step N/N' as if it had hung."""
    from types import SimpleNamespace

    from transformers import TrainerState

    from hf_mrp.research.sweep.console import TrialTable
    from hf_mrp.research.sweep.trial import ProgressReport

    reports: list[dict] = []
    progress, state = ProgressReport(reports.append), TrainerState(max_steps=3, global_step=2)
    progress.on_step_end(None, state, None)
    progress.on_log(None, state, None, logs={"loss": 2.5})
    state.global_step = 3
    progress.on_step_end(None, state, None)
    table, trial = TrialTable([], total=0), SimpleNamespace(config={"run": "fisher_lam0.6_seed0"})
    shown = []
    for report in reports:
        table.on_trial_result(0, [], trial, report)
        shown.append(table.progress["fisher_lam0.6_seed0"])
    assert shown == ["step 2/3  loss 2.5", "auditing after step 3/3"]
