"""The paper-comparison table: the paper's counts as rates per 1,000 positions next to a sweep row."""

from dataclasses import replace

import pytest

from hf_mrp.research.reports.paper_reference import PAPER_POSITIONS, PAPER_RUNS, paper_comparison_rows
from hf_mrp.research.sweep.results import MetricSummary, PairedDifference, Row


def entry(mean, ci=None):
    return MetricSummary(mean=mean, std=None, min=mean, max=mean, ci=ci, per_seed={"0": mean})


def difference(mean, ci=None):
    return PairedDifference(mean=mean, per_seed={"0": mean}, ci=ci, seed_ci=None)


def row_of(objective, lam, metrics, vs_control=None):
    return Row(objective, lam, "", False, objective, [0], [f"{objective}_lam{lam}_seed0"], metrics, vs_control)


def test_rows_in_the_papers_units():
    metrics = {
        "w2r": entry(40.0, [30.0, 50.0]),
        "r2w": entry(20.0),
        "median_margin_change": entry(0.1),
        "accuracy": entry(0.45, [0.44, 0.46]),
        "structural_share": entry(0.5),
    }
    vs_control = {
        "w2r": difference(4.0, [-2.0, 10.0]),
        "r2w": difference(1.0),
        "median_margin_change": difference(0.05),
        "accuracy": difference(0.002),
        "structural_share": difference(-0.1),
    }
    row = row_of("fisher", 0.6, metrics, vs_control)
    others = [replace(row, variant="head"), replace(row, objective="entropy"), replace(row, lam=0.7)]
    table = paper_comparison_rows([row] + others, n_positions=4000, baseline_accuracy=0.42)
    assert len(table) == 5  # one per published quantity of fisher 0.6; other rows have no paper number
    by_quantity = {line[2]: line for line in table}
    w2r = by_quantity["W->R per 1,000"]
    assert w2r[3] == f"{16_327 * 1000 / PAPER_POSITIONS:.1f}" == "63.6"
    assert w2r[4] == "10.0 [7.5, 12.5]" and w2r[5] == "1.0 [-0.5, 2.5]"  # 40 / 4000 * 1000 ...
    accuracy = by_quantity["accuracy change"]
    assert accuracy[3] == "+4.28 pp" and accuracy[4] == "+3.00 pp [+2.00 pp, +4.00 pp]" and accuracy[5] == "+0.20 pp"
    assert by_quantity["structural share of net"][3] == "65.9%"
    assert by_quantity["median margin change"][3] == "+27.8%"
    assert PAPER_RUNS[("margin", 1.0)]["r2w"] == 39_108
    assert paper_comparison_rows([replace(row, vs_control=None)], 4000, 0.42)[0][5] == "n/a"


def test_rates_scale_with_audit_size():
    (line,) = paper_comparison_rows(
        [row_of("margin", 1.0, {"r2w": entry(160.0)})], n_positions=16_000, baseline_accuracy=0.4
    )
    assert float(line[3]) == pytest.approx(39_108 * 1000 / PAPER_POSITIONS, abs=0.05)  # printed to 0.1: half of it
    assert line[4] == "10.0"
