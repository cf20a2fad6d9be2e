"""The paper's released runs, whole: each run's margin audit (seven numbers) and training curve, beside a sweep's.

released_runs.json (next to this module) holds what github.com/mellowmarshall/mrp-paper releases under
``results/``: for the baseline and every refined run, the seven numbers of ``margin_audit_fp32.json`` and, where
the run's ``train_summary.json`` is released, ``loss_ce`` / ``loss_mrp`` / ``grad_norm`` of logged steps from its
``log_history`` (and ``loss_total``, the released code's sum, kept as a check of every step's transcription).
Every entry names its file, the commit of the stored version and the key of each number; the numbers were copied
from the files, none computed (the curves: every logged step of the 1,000-step log, said in each curve's
``steps_read``). Qwen3.5-4B-Base, full model, 256,577 WikiText-103
validation positions audited in-sample, one seed, no control.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...reporting.markdown import escape_cell, fmt_count, fmt_number

if TYPE_CHECKING:
    from ..sweep.results import BaselineNumbers, Row

DATA_FILE = Path(__file__).with_name("released_runs.json")
NUMBERS = ("p50", "fraction_margin_lt_0_5", "alpha", "beta", "r_squared", "entropy_margin_rho", "n_positions")
HEADERS = ("median margin", "Pr(m < 0.5)", "alpha", "beta", "R^2", "entropy-margin rho", "positions")
# the sweep's metric (results.json) that is each released number
SWEEP_KEYS = {
    "p50": "median_margin",
    "fraction_margin_lt_0_5": "pr_margin_lt_0_5",
    "alpha": "gap_alpha",
    "beta": "gap_beta",
    "r_squared": "gap_r_squared",
    "entropy_margin_rho": "entropy_margin_rho",
}
CURVE_KEYS = ("loss_ce", "loss_mrp", "grad_norm")
TABLE_HEADER = ("", "run", "objective", "lambda", *HEADERS, "file")


@dataclass(frozen=True)
class ReleasedRun:
    """One released run: its margin audit's seven numbers and (where released) its training curve."""

    run: str
    objective: str | None  # None: the baseline
    lam: float | None
    numbers: dict[str, float]
    audit_file: str
    audit_commit: str
    curve: dict[str, Any] | None  # step, loss_ce, loss_mrp, grad_norm (lists), file, commit, keys, steps_read
    protocol: dict[str, Any] | None  # top-level settings of its train_summary.json as read

    @property
    def label(self) -> str:
        return "baseline" if self.objective is None else f"{self.objective} {self.lam:g}"


@functools.cache
def released_data() -> dict[str, Any]:
    """released_runs.json as it is (source, the numbers' names, the runs)."""
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


@functools.cache
def released_runs() -> tuple[ReleasedRun, ...]:
    """Every released run, the baseline first, in the data file's order."""
    return tuple(
        ReleasedRun(
            run=entry["run"],
            objective=entry["objective"],
            lam=entry["lambda"],
            numbers=entry["audit"]["numbers"],
            audit_file=entry["audit"]["file"],
            audit_commit=entry["audit"]["commit"],
            curve=entry["curve"],
            protocol=entry["protocol"],
        )
        for entry in released_data()["runs"]
    )


def _cells(values: Mapping[str, float | int | None]) -> list[str]:
    return [
        fmt_count(values[name]) if name == "n_positions" else fmt_number(values[name], 4 if name == "r_squared" else 3)
        for name in NUMBERS
    ]


def _released_row(run: ReleasedRun) -> list[str]:
    objective = "" if run.objective is None else run.objective
    lam = "" if run.lam is None else f"{run.lam:g}"
    where = f"[{run.audit_file}](https://github.com/mellowmarshall/mrp-paper/blob/{run.audit_commit}/{run.audit_file})"
    return ["released", escape_cell(run.run), objective, lam, *_cells(run.numbers), where]


def _sweep_row(row: Row, n_positions: int) -> list[str]:
    values: dict[str, float | None] = {name: row.mean(key) for name, key in SWEEP_KEYS.items()}
    values["n_positions"] = n_positions
    objective = "control" if row.control else row.objective
    return ["this sweep", escape_cell(row.label), objective, f"{row.lam:g}", *_cells(values), "results.json"]


def released_table(rows: list[Row], baseline: BaselineNumbers | None, n_positions: int) -> list[list[str]]:
    """The released runs and the sweep's plain rows (mean over seeds), sorted by objective and lambda with the
    released run first: [source, run, objective, lambda, the seven numbers, file]."""
    keyed: list[tuple[tuple, list[str]]] = []
    for number, run in enumerate(released_runs()):
        keyed.append((("" if run.objective is None else run.objective, run.lam or 0.0, 0, number), _released_row(run)))
    if baseline is not None:
        values = {
            "p50": baseline.median_margin,
            "fraction_margin_lt_0_5": baseline.pr_margin_lt_0_5,
            "alpha": baseline.gap_alpha,
            "beta": baseline.gap_beta,
            "r_squared": baseline.gap_r_squared,
            "entropy_margin_rho": baseline.entropy_margin_rho,
            "n_positions": baseline.n_positions,
        }
        keyed.append((("", 0.0, 1, 0), ["this sweep", "baseline", "", "", *_cells(values), "results.json"]))
    for number, row in enumerate(rows):
        if not row.variant:
            keyed.append(((row.objective, float(row.lam), 1, number), _sweep_row(row, n_positions)))
    return [cells for _, cells in sorted(keyed, key=lambda item: item[0])]


__all__ = ["DATA_FILE", "NUMBERS", "ReleasedRun", "released_data", "released_runs", "released_table"]
