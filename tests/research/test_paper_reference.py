"""The paper-comparison table: the paper's counts as rates per 1,000 positions next to a sweep row."""

import pytest

from hf_mrp.research.reports.paper_reference import PAPER_POSITIONS, PAPER_RUNS, paper_comparison_rows


def entry(mean, ci=None):
    return {"mean": mean, "ci": ci}


def test_rows_in_the_papers_units():
    row = {
        "objective": "fisher",
        "lambda": 0.6,
        "variant": "",
        "control": False,
        "metrics": {
            "w2r": entry(40.0, [30.0, 50.0]),
            "r2w": entry(20.0),
            "median_margin_change": entry(0.1),
            "accuracy": entry(0.45, [0.44, 0.46]),
            "structural_share": entry(0.5),
        },
        "vs_control": {
            "w2r": entry(4.0, [-2.0, 10.0]),
            "r2w": entry(1.0),
            "median_margin_change": entry(0.05),
            "accuracy": entry(0.002),
            "structural_share": entry(-0.1),
        },
    }
    others = [dict(row, variant="head"), dict(row, objective="entropy"), dict(row, **{"lambda": 0.7})]
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
    assert paper_comparison_rows([dict(row, vs_control=None)], 4000, 0.42)[0][5] == "n/a"


def test_rates_scale_with_audit_size():
    row = {"objective": "margin", "lambda": 1.0, "variant": "", "metrics": {"r2w": entry(160.0)}, "vs_control": None}
    (line,) = paper_comparison_rows([row], n_positions=16_000, baseline_accuracy=0.4)
    assert float(line[3]) == pytest.approx(39_108 * 1000 / PAPER_POSITIONS, abs=0.05)
    assert line[4] == "10.0"
