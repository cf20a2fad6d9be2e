"""The paper's released runs, whole (hf_mrp/research/reports/released_runs.json): every run's seven margin-audit
numbers and its whole training curve, the sweep report's table of all of them, and a run's curves drawn over
theirs (paper_curves.png) with its departures from the released protocol."""

import math
import re

import torch

from hf_mrp.research.reports.paper_curves import departures, write_paper_curves
from hf_mrp.research.reports.paper_reference import PAPER_RUNS
from hf_mrp.research.reports.released_runs import (
    NUMBERS,
    TABLE_HEADER,
    released_data,
    released_runs,
    released_table,
)
from hf_mrp.research.sweep.results import BaselineNumbers, MetricSummary, Row

RELEASED = (  # results/ of github.com/mellowmarshall/mrp-paper as stored: the baseline and nine refined runs
    "baseline_audit",
    "run4_marginmax_1.0",
    "run6_marginmax_0.3",
    "run7_marginmax_0.1",
    "run8_marginmax_0.15",
    "run9_fisher_0.15",
    "run10_fisher_0.3",
    "run11_fisher_0.6",
    "run12_fisher_1.0",
    "run13_fisher_2.0",
)


def test_every_released_run_has_its_seven_numbers_and_its_source():
    runs = released_runs()
    assert tuple(run.run for run in runs) == RELEASED
    for run in runs:
        assert set(run.numbers) == set(NUMBERS), run.run
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in run.numbers.values()), run.run
        assert run.numbers["n_positions"] == 256_577  # every released audit read the same positions
        assert run.audit_file == f"results/{run.run}/margin_audit_fp32.json"
        assert re.fullmatch(r"[0-9a-f]{40}", run.audit_commit)
        if run.run != "baseline_audit":  # the objective and lambda are the folder's name
            name = {"margin": "marginmax", "fisher": "fisher"}[run.objective]
            assert float(run.run.split(f"_{name}_")[1]) == run.lam


def test_every_released_curve_is_whole_and_runs_without_one_are_named():
    data = released_data()
    without = {run.run for run in released_runs() if run.curve is None}
    assert without == {"baseline_audit", *data["not_released"]}  # the baseline trained nothing
    assert set(data["not_released"]) == {"run8_marginmax_0.15", "run9_fisher_0.15"}
    for run in released_runs():
        if run.curve is None:
            continue
        steps = run.curve["step"]
        assert run.curve["file"] == f"results/{run.run}/train_summary.json"
        assert steps == list(range(1, 1001))  # every logged step of the 1,000-step log
        assert all(len(run.curve[key]) == len(steps) for key in ("loss_ce", "loss_mrp", "loss_total", "grad_norm"))
        for ce, mrp, total in zip(run.curve["loss_ce"], run.curve["loss_mrp"], run.curve["loss_total"]):
            # the released code logs loss_total = loss_ce + alpha_weight * loss_mrp, each a float32 of size < 4
            # rounded to float32 (half an ulp, 2^-23 * 4 / 2 = 2.4e-7, per operation: two): a transcription slip
            # in any of the three numbers breaks it
            assert abs(ce + run.lam * mrp - total) <= 1e-6, (run.run, ce, mrp, total)
        # logged from bfloat16 gradients: every grad_norm is a bfloat16 value
        assert all(value > 0 and torch.tensor(value).bfloat16().item() == value for value in run.curve["grad_norm"])
        # the Fisher penalty is positive, margin-max's is negative (it rewards the margin)
        assert all((v > 0) == (run.objective == "fisher") for v in run.curve["loss_mrp"]), run.run


def test_the_flip_tables_median_change_is_the_released_p50s():
    """paper_reference's median margin change at Fisher 0.6 / 1.0 is p50(after) / p50(baseline) - 1 of the same
    released files: the two tables trace to one set of numbers."""
    p50 = {run.run: run.numbers["p50"] for run in released_runs()}
    for lam, run in ((0.6, "run11_fisher_0.6"), (1.0, "run12_fisher_1.0")):
        assert PAPER_RUNS[("fisher", lam)]["median_margin_change"] == p50[run] / p50["baseline_audit"] - 1.0


def entry(mean):
    return MetricSummary(mean=mean, std=None, min=mean, max=mean, ci=None, per_seed={"0": mean})


def test_the_table_lists_every_released_run_beside_the_sweeps_rows():
    metrics = {
        "median_margin": entry(1.234),
        "pr_margin_lt_0_5": entry(0.2),
        "gap_alpha": entry(0.5),
        "gap_beta": entry(0.9),
        "gap_r_squared": entry(0.99),
        "entropy_margin_rho": entry(-0.7),
    }
    row = Row("fisher", 0.6, "", False, "fisher", [0], ["fisher_lam0.6_seed0"], metrics, None)
    head_row = Row("fisher", 0.6, "head", False, "fisher head", [0], ["head"], metrics, None)
    baseline = BaselineNumbers("baseline", 62, 0.4, 1.0, 0.3, 0.7, 0.99, None, "tiny", 0.95, -0.6)
    table = released_table([row, head_row], baseline, n_positions=4000)
    assert all(len(cells) == len(TABLE_HEADER) for cells in table)
    released = [cells for cells in table if cells[0] == "released"]
    assert [cells[1].replace("\\", "") for cells in released] == sorted(RELEASED, key=lambda n: released_key(n))
    ours = [cells for cells in table if cells[0] == "this sweep"]
    assert len(ours) == 2  # the baseline and the plain row; a variant row has no released counterpart
    assert ours[1][4:11] == ["1.234", "0.200", "0.500", "0.900", "0.9900", "-0.700", "4,000"]
    fisher = [cells[1] for cells in table if cells[2] == "fisher" and cells[3] == "0.6"]
    assert fisher == ["run11\\_fisher\\_0.6", "fisher"]  # the released run, then the sweep's row beside it


def released_key(name):
    run = next(run for run in released_runs() if run.run == name)
    return ("" if run.objective is None else run.objective, run.lam or 0.0)


def test_a_runs_curves_are_drawn_over_the_released_ones_with_its_departures(tmp_path):
    log = [
        {"step": step, "loss_ce": 3.0 - 0.1 * step, "loss_mrp": 0.2, "grad_norm": 1.0, "loss": 3.0} for step in (1, 2)
    ]
    log.append({"step": 2, "train_runtime": 1.0})  # the Trainer's closing entry has no curve keys
    run = {"model": "tiny", "max_steps": 2, "learning_rate": 2e-5, "block_size": 2048}
    paths = write_paper_curves(tmp_path, log, run)
    assert paths["paper_curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = __import__("json").loads(paths["paper_protocol"].read_text())
    assert written["curve"]["step"] == [1.0, 2.0]
    differing = {item["setting"] for item in written["departures"]}
    assert {"model", "max_steps"} <= differing and not {"learning_rate", "block_size"} & differing
    protocol = next(r.protocol for r in released_runs() if r.run == "run4_marginmax_1.0")
    same = {
        "model": protocol["model_id"],
        "max_steps": 1000,
        "learning_rate": 2e-5,
        "block_size": 2048,
        "dataset_config": "wikitext-103-raw-v1",
        "bf16": True,
        "effective_batch_blocks": 16,
        "full_model": True,
        "audit_positions": 256_577,
    }
    assert departures(same) == []
