"""The sweep's report: results.md (dose-response, spread, class breakdown, paired and entropy-matched tables, the
paper's numbers), the three plots, and the console summary, all read from the typed results (results.py). Cells
are printed by cells.py."""

from __future__ import annotations

from pathlib import Path

from ...reporting.markdown import escape_cell, fmt_count, fmt_kind, fmt_number, fmt_percent, table
from ...stats.token_classes import CLASSES
from ..reports import sweep_plots
from ..reports.paper_reference import PAPER_MODEL, paper_comparison_rows
from ..reports.released_runs import TABLE_HEADER, released_table
from .cells import cell_ci, cell_paired, cell_spread, row_cells
from .metrics import DESCRIPTIONS, HEADERS, KINDS, MAIN_TABLE, PAIRED_TABLE
from .plan import CONTROL, format_lambda
from .results import EntropyMatch, Row, SweepResults

PLOTS = {
    "flips": "flips_vs_lambda.png",
    "margin_change": "margin_change_vs_lambda.png",
    "class_net": "class_net_vs_lambda.png",
}
NO_CONTROL = "(no run with a finished control)"
RUNS_HEADER = (
    "run",
    "seed",
    "steps",
    "seconds",
    "W->R",
    "R->W",
    "net",
    "net attributable",
    "median margin change",
    "churn",
)
RUNS_METRICS = ("w2r", "r2w", "net", "net_attributable", "median_margin_change", "churn")


def markdown_report(results: SweepResults) -> str:
    """results.md: what was swept, then every table, the plots and the definitions."""
    confidence = f"{results.head.bootstrap.confidence:.0%}"
    parts = [
        *_setting_section(results),
        *_dose_response_sections(results, confidence),
        *_paired_sections(results.aggregate.rows, results.head.variants, confidence),
        "## Next to the paper (same units)",
        _paper_section(results),
        "## Geometry or sharpening: Fisher against entropy at matched strength",
        _entropy_section(results.aggregate.entropy_matched, confidence),
        "## Runs",
        _runs_table(results),
        "## Plots",
        *[f"![{name}]({file})" for name, file in results.plots.items()],
        "## Definitions",
        "\n".join(f"- {HEADERS[key]}: {DESCRIPTIONS[key]}" for key in MAIN_TABLE),
    ]
    return "\n\n".join(parts) + "\n"


def _setting_section(results: SweepResults) -> list[str]:
    """The title, what was swept on which positions with which training, the baseline, the command, the runs
    left out."""
    head, base = results.head, results.aggregate.baseline
    pos, training = head.positions, head.training
    held = (
        "held out from training (--holdout true: training used the blocks after them)"
        if pos.holdout
        else "also part of the training data (--holdout false)"
    )
    steps = sorted({run.steps for run in results.aggregate.runs if run.steps is not None})
    adapter = (
        f"LoRA r={training.lora_r} on layers {training.lora_layers or 'all'}"
        if training.use_lora
        else "full weights (no LoRA)"
    )
    parts = [
        "# MRP dose-response sweep",
        f"Model: {escape_cell(str(base.model))}. Objectives: {', '.join(head.objectives)}; "
        f"lambdas: {', '.join(format_lambda(v) for v in head.lambdas)}; seeds: "
        f"{', '.join(str(s) for s in head.seeds)}; each seed has a control at lambda = 0 (cross-entropy "
        f"only: same data, steps, adapter and seed; objective '{head.control.objective}' at weight 0).",
        f"Audited positions: {fmt_count(pos.n)} (the first {fmt_count(pos.n)} positions of the data, in "
        f"blocks of {pos.block_size} tokens; blocks sha256 {str(pos.blocks_sha256)[:12]}), {held}. The same "
        f"positions are audited before (one shared baseline audit, `baseline/`) and after every run.",
        f"Training: {training.max_steps} steps per run (trained: {', '.join(str(s) for s in steps) or 'n/a'}), "
        f"batch {training.per_device_train_batch_size} x {training.gradient_accumulation_steps} x "
        f"{training.block_size} tokens, learning rate {training.learning_rate}, {adapter}.",
        f"Baseline: accuracy {fmt_percent(base.accuracy, 2)}, median margin {fmt_number(base.median_margin)}, "
        f"Pr(m < 0.5) {fmt_number(base.pr_margin_lt_0_5)}, alpha {fmt_number(base.gap_alpha)}, "
        f"R^2 {fmt_number(base.gap_r_squared, 4)}.",
        "Command:",
        f"```\n{head.command}\n```",
    ]
    if results.aggregate.missing_runs:
        parts.append(f"**Not finished (left out):** {', '.join(results.aggregate.missing_runs)}.")
    for run in results.aggregate.failed_runs:
        parts.append(f"**FAILED (diverged, left out of every row):** {run.name}: {escape_cell(run.reason)}")
    return parts


def _dose_response_sections(results: SweepResults, confidence: str) -> list[str]:
    """Mean over seeds with the bootstrap interval, the spread over seeds, the net by token class."""
    pos, boot, rows = results.head.positions, results.head.bootstrap, results.aggregate.rows
    ci_note = (
        f"brackets: block-bootstrap {confidence} CI ({boot.n_resamples} resamples of the "
        f"{pos.n_blocks} audited blocks with replacement, every position of a drawn block kept, rng seed "
        f"{boot.seed}; each seed resampled with the same blocks, then averaged)"
        if boot.n_resamples
        else "no bootstrap (--n_bootstrap 0)"
    )
    header = ["objective", "lambda", "seeds"] + [HEADERS[key] for key in MAIN_TABLE]
    return [
        "## Dose-response",
        f"Mean over seeds; {ci_note}. Net attributable = net(run) - net(control of the same seed).",
        table(
            header, [row_cells(r) + [str(len(r.seeds))] + [cell_ci(r.metrics[k], k) for k in MAIN_TABLE] for r in rows]
        ),
        "## Spread over seeds",
        "Standard deviation over seeds (ddof = 1; n/a with one seed); min to max.",
        table(
            header,
            [row_cells(r) + [str(len(r.seeds))] + [cell_spread(r.metrics[k], k) for k in MAIN_TABLE] for r in rows],
        ),
        "## Net corrections by token class of the target",
        f"Net = W->R - R->W of the targets of each class. Mean over seeds; bootstrap {confidence} CI in brackets.",
        table(
            ["objective", "lambda"] + list(CLASSES),
            [row_cells(r) + [cell_ci(r.metrics[f"net_{c}"], f"net_{c}") for c in CLASSES] for r in rows],
        ),
    ]


def _paired_sections(rows: list[Row], variants: dict[str, dict], confidence: str) -> list[str]:
    """Every row against the control of its seeds (each variant's named), the main numbers, then the net by token
    class."""
    paired = [(r, r.vs_control) for r in rows if r.vs_control]
    pairing = "".join(f"\n- {name}: paired with {escape_cell(v['control'])}." for name, v in variants.items())
    return [
        "## Against the control (paired)",
        f"Run minus the CE-only control of the same seed and adapter scope, mean over seeds; [paired "
        f"block-bootstrap {confidence} CI: both runs on the same resampled blocks]; {{t {confidence} CI of the "
        f"per-seed differences, with n - 1 degrees of freedom; absent with one seed}}. Shares in percentage points."
        + (f" The variants' controls:{pairing}" if pairing else ""),
        table(
            ["row", "lambda"] + [HEADERS[key] for key in PAIRED_TABLE],
            [row_cells(r) + [cell_paired(vs[k], k) for k in PAIRED_TABLE] for r, vs in paired],
        )
        if paired
        else NO_CONTROL,
        "## Attributable net by token class of the target",
        "net(class) of the run minus net(class) of its control; intervals as above. Classes are the paper's "
        "(docs/spec.md, Token breakdowns).",
        table(
            ["row", "lambda"] + list(CLASSES),
            [row_cells(r) + [cell_paired(vs[f"net_{c}"], f"net_{c}") for c in CLASSES] for r, vs in paired],
        )
        if paired
        else NO_CONTROL,
    ]


def _runs_table(results: SweepResults) -> str:
    return table(
        RUNS_HEADER,
        [
            [
                escape_cell(run.name),
                str(run.seed),
                str(run.steps),
                "n/a" if run.seconds is None else f"{run.seconds:.0f}",
            ]
            + [fmt_kind(run.metrics[k], KINDS[k]) for k in RUNS_METRICS]
            for run in results.aggregate.runs
        ],
    )


def _paper_section(results: SweepResults) -> str:
    """The paper's flip numbers beside this sweep's, then every released run's margin audit beside its rows."""
    released = (
        "Every released run of the paper (github.com/mellowmarshall/mrp-paper `results/*/margin_audit_fp32.json`, "
        "each number copied from the file linked, hf_mrp/research/reports/released_runs.json) beside this sweep's "
        "rows (mean over seeds, after refinement, on this sweep's positions):\n\n"
        + table(
            list(TABLE_HEADER),
            released_table(results.aggregate.rows, results.aggregate.baseline, results.head.positions.n),
        )
    )
    rows = paper_comparison_rows(results.aggregate.rows, results.head.positions.n, results.aggregate.baseline.accuracy)
    if not rows:
        return "No row of this sweep has a published paper flip number at the same objective and lambda.\n\n" + released
    normalization = results.head.training.mrp_margin_normalization
    units = (
        "margin lambdas are in the paper's units (the penalty divided by the gated positions)"
        if normalization in (None, "gated")
        else f"margin lambdas are NOT in the paper's units (mrp_margin_normalization = {normalization})"
    )
    return (
        f"Paper: {PAPER_MODEL}; its counts as rates per 1,000 positions. Here: mean over seeds [block-bootstrap "
        f"CI]; minus control: the part attributable to the objective [paired CI]. The paper has no control, so "
        f"its numbers compare with 'this sweep', not with the attributable part; {units}.\n\n"
        + table(["objective", "lambda", "quantity", "paper", "this sweep", "minus control"], rows)
        + "\n\n"
        + released
    )


def _entropy_section(matches: list[EntropyMatch], confidence: str) -> str:
    if not matches:
        return (
            "No match: the sweep has no plain fisher row or no plain entropy row (run entropy on a lambda grid "
            "with --entropy_lambdas)."
        )
    text = (
        "For each fisher lambda, the entropy lambda (from its grid) whose median margin change, mean over seeds, "
        "is closest; then fisher minus entropy per seed on the same resampled blocks [paired block-bootstrap "
        f"{confidence} CI] {{t CI over seeds}}. A difference that excludes 0 is what geometry adds over "
        "sharpening of equal strength."
    )
    keys = ("net", "w2r", "r2w", "accuracy", "churn")
    rows = [
        [
            format_lambda(m.reference_lambda),
            fmt_kind(m.reference_value, "signed_percent"),
            format_lambda(m.entropy_lambda),
            fmt_kind(m.entropy_value, "signed_percent"),
        ]
        + [cell_paired((m.fisher_minus_entropy or {}).get(k), k) for k in keys]
        for m in matches
    ]
    header = ["fisher lambda", "its median margin change", "entropy lambda", "its median margin change"]
    return text + "\n\n" + table(header + [f"fisher - entropy: {HEADERS[k]}" for k in keys], rows)


def write_plots(sweep_dir: Path, results: SweepResults) -> dict[str, str]:
    rows = [row for row in results.aggregate.rows if not row.variant]  # the plain dose-response curves
    confidence = results.head.bootstrap.confidence
    objectives = [o for o in results.head.objectives if any(r.objective == o for r in rows)] or [CONTROL]
    sweep_plots.plot_flips_vs_lambda(sweep_dir / PLOTS["flips"], rows, objectives, confidence)
    sweep_plots.plot_margin_change_vs_lambda(sweep_dir / PLOTS["margin_change"], rows, objectives, confidence)
    sweep_plots.plot_class_net_vs_lambda(sweep_dir / PLOTS["class_net"], rows, objectives, CLASSES, confidence)
    return dict(PLOTS)


def summary_lines(results: SweepResults) -> list[str]:
    """The console summary: the failed runs, then one line per row."""
    lines = [f"FAILED {run.name}: {run.reason}" for run in results.aggregate.failed_runs]
    for row in results.aggregate.rows:
        lines.append(
            f"{' '.join(row_cells(row)):<22} W->R {fmt_kind(row.mean('w2r'), 'count'):>8}  R->W "
            f"{fmt_kind(row.mean('r2w'), 'count'):>8}  net {fmt_kind(row.mean('net'), 'count'):>8}  attributable "
            f"{fmt_kind(row.mean('net_attributable'), 'signed_count'):>8}  median margin "
            f"{fmt_kind(row.mean('median_margin_change'), 'signed_percent')}"
        )
    return lines


__all__ = ["PLOTS", "markdown_report", "write_plots", "summary_lines"]
