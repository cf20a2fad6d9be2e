"""Aggregating a sweep: per-run numbers into rows (mean over seeds, spread, block-bootstrap interval), each run
against its control and Fisher against entropy at matched strength (paired.py), the per-run entries and the
baseline's numbers; the "rows", "runs", "entropy_matched", "missing_runs", "failed_runs" and "baseline" of
results.json. A run that diverged is a failed run: left out of every row, listed with its reason."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...audit.geometry import AuditResult
from ...errors import MRPUserError
from ...stats import BlockIndex, block_bootstrap_distribution
from ...stats.flips import finite_or_none
from ...stats.intervals import percentile_interval
from ..run_folders import run_is_whole
from .arguments import MATCHED_OBJECTIVE, REFERENCE_OBJECTIVE, SweepArguments
from .metrics import METRIC_KEYS
from .paired import match_entropy, paired_difference
from .plan import CONTROL, RunSpec, row_keys, row_label, run_fields
from .results import (
    Aggregate,
    BaselineNumbers,
    EntropyMatch,
    FailedRun,
    MetricSummary,
    PairedDifference,
    Row,
    RunEntry,
)
from .run_statistics import RunData, Shared, load_run, row_means, run_statistics, shared_positions, with_attributable

RowKey = tuple[str, float, str]  # (objective, lambda, variant): plan.row_keys


@dataclass
class SweepTable:
    """The finished runs' numbers: per run on all positions, per row (mean over seeds), on every resample."""

    runs: list[RunData]
    control_of: np.ndarray  # [runs]: the index of each run's control (-1: none)
    keys: list[RowKey]  # the rows that have a finished run, in report order
    members: list[list[int]]  # [rows]: the indices of each row's runs
    point_runs: np.ndarray  # [runs, METRICS]
    point_rows: np.ndarray  # [rows, METRICS]
    distribution: np.ndarray | None  # [resamples, runs, METRICS]; None without bootstrap
    low: np.ndarray  # [rows, METRICS]: the bootstrap interval (NaN without bootstrap)
    high: np.ndarray
    confidence: float

    def paired(self, pairs: list[tuple[int, int]]) -> dict[str, PairedDifference]:
        """run a - run b over ``pairs`` (one per seed) for every metric (paired.paired_difference)."""
        seeds = [self.runs[a].spec.seed for a, _ in pairs]
        return paired_difference(self.point_runs, self.distribution, pairs, METRIC_KEYS, seeds, self.confidence)


def _spread(values: np.ndarray) -> tuple[float | None, float | None, float | None]:
    """(std with ddof = 1, min, max) of the finite values (None where undefined)."""
    finite = values[np.isfinite(values)]
    return (
        finite_or_none(np.std(finite, ddof=1)) if finite.size > 1 else None,
        finite_or_none(finite.min()) if finite.size else None,
        finite_or_none(finite.max()) if finite.size else None,
    )


def _row_metrics(table: SweepTable, r: int, objective: str) -> dict[str, MetricSummary | None]:
    """Row ``r``'s entry for every metric: mean over seeds, spread, bootstrap interval, the per-seed values."""
    member = table.members[r]
    metrics: dict[str, MetricSummary | None] = {}
    for k, key in enumerate(METRIC_KEYS):
        if key == "net_attributable" and objective == CONTROL:
            metrics[key] = None
            continue
        per_seed = table.point_runs[member, k]
        low, high = table.low[r, k], table.high[r, k]
        std, smallest, largest = _spread(per_seed)
        metrics[key] = MetricSummary(
            mean=finite_or_none(table.point_rows[r, k]),
            std=std,
            min=smallest,
            max=largest,
            ci=[float(low), float(high)] if np.isfinite(low) and np.isfinite(high) else None,
            per_seed={str(table.runs[i].spec.seed): finite_or_none(v) for i, v in zip(member, per_seed)},
        )
    return metrics


def _run_entry(run: RunData, values: np.ndarray, settings: dict) -> RunEntry:
    """``settings``: the run fields it trained with beside the shared ones (plan.run_fields)."""
    spec = run.spec
    return RunEntry(
        name=spec.name,
        objective=spec.objective,
        train_objective=spec.train_objective,
        lam=spec.lam,
        seed=spec.seed,
        control=spec.control,
        dir=f"runs/{spec.name}",
        steps=run.steps,
        seconds=run.seconds,
        variant=spec.variant,
        settings=settings,
        control_run=spec.control_run or None,
        metrics={key: finite_or_none(values[k]) for k, key in enumerate(METRIC_KEYS)},
        flip_audit=run.flip_audit,
    )


def baseline_numbers(baseline: AuditResult) -> BaselineNumbers:
    summary = baseline.summary
    return BaselineNumbers(
        dir="baseline",
        n_positions=summary.n_positions,
        accuracy=summary.accuracy,
        median_margin=summary.median_margin,
        pr_margin_lt_0_5=summary.fraction_margin_lt_0_5,
        gap_alpha=summary.gap_fit.alpha,
        gap_r_squared=summary.gap_fit.r_squared,
        blocks_sha256=summary.provenance.get("blocks_sha256"),
        model=summary.provenance.get("model"),
        gap_beta=summary.gap_fit.beta,
        entropy_margin_rho=summary.entropy_margin_spearman,
    )


def _finished_runs(
    plan: Sequence[RunSpec], sweep_dir: Path, baseline: AuditResult, failed: dict[str, str]
) -> tuple[list[RunSpec], list[RunData]]:
    """(the specs of the finished runs, their data); refused when none finished."""
    finished = [spec for spec in plan if run_is_whole(sweep_dir / "runs" / spec.name)]
    runs = [load_run(spec, sweep_dir / "runs" / spec.name, baseline) for spec in finished]
    if not runs:
        why = f" ({len(failed)} failed: {'; '.join(f'{k}: {v}' for k, v in failed.items())})" if failed else ""
        raise MRPUserError(
            f"no finished runs in {sweep_dir / 'runs'} to aggregate{why}; run the sweep without "
            "--aggregate_only" + (", with a lower --learning_rate" if failed else "")
        )
    return finished, runs


def _sweep_table(args: SweepArguments, runs: list[RunData], shared: Shared) -> SweepTable:
    """Every run's numbers, grouped into the rows that have a finished run, with their bootstrap intervals."""
    position = {run.spec.name: i for i, run in enumerate(runs)}
    control_of = np.asarray([-1 if run.spec.control else position.get(run.spec.control_run, -1) for run in runs])
    kept = [(key, [i for i, run in enumerate(runs) if _row_key(run.spec) == key]) for key in row_keys(args)]
    keys, members = [key for key, m in kept if m], [m for _, m in kept if m]
    point_runs = with_attributable(run_statistics(runs, shared), control_of)
    point_rows = row_means(point_runs, members)
    distribution = None
    low = high = np.full(point_rows.shape, np.nan)
    if args.n_bootstrap:
        blocks = BlockIndex.from_labels(shared.block)
        start = time.perf_counter()
        distribution = with_attributable(
            block_bootstrap_distribution(
                lambda index: run_statistics(runs, shared, index), blocks, args.n_bootstrap, args.bootstrap_seed
            ),
            control_of,
        )
        interval = percentile_interval(row_means(distribution, members), args.confidence)
        low, high = np.asarray(interval.low), np.asarray(interval.high)
        print(
            f"results: {args.n_bootstrap} block-bootstrap resamples of {blocks.n_blocks} blocks "
            f"({shared.n} positions) x {len(runs)} runs in {time.perf_counter() - start:.1f}s",
            flush=True,
        )
    return SweepTable(runs, control_of, keys, members, point_runs, point_rows, distribution, low, high, args.confidence)


def _row_key(spec: RunSpec) -> RowKey:
    return spec.objective, spec.lam, spec.variant


def _rows(args: SweepArguments, table: SweepTable) -> list[Row]:
    rows = []
    for r, ((objective, lam, variant), member) in enumerate(zip(table.keys, table.members)):
        pairs = [(i, int(table.control_of[i])) for i in member if table.control_of[i] >= 0]
        rows.append(
            Row(
                objective=objective,
                lam=lam,
                variant=variant,
                control=objective == CONTROL,
                label=row_label(objective, lam, variant, args),
                seeds=[table.runs[i].spec.seed for i in member],
                runs=[table.runs[i].spec.name for i in member],
                metrics=_row_metrics(table, r, objective),
                vs_control=table.paired(pairs) if pairs and objective != CONTROL else None,
            )
        )
    return rows


def _fisher_against_entropy(rows: list[Row], table: SweepTable) -> list[EntropyMatch]:
    """match_entropy's matches, each with the paired differences fisher - entropy over the seeds with both."""
    matches = match_entropy(rows)
    by_seed = {key: {table.runs[i].spec.seed: i for i in m} for key, m in zip(table.keys, table.members)}
    for match in matches:
        fisher = by_seed[(REFERENCE_OBJECTIVE, match.reference_lambda, "")]
        entropy = by_seed[(MATCHED_OBJECTIVE, match.entropy_lambda, "")]
        pairs = [(fisher[seed], entropy[seed]) for seed in sorted(set(fisher) & set(entropy))]
        match.fisher_minus_entropy = table.paired(pairs) if pairs else None  # None: no seed has both runs
    return matches


def aggregate(
    args: SweepArguments,
    plan: Sequence[RunSpec],
    sweep_dir: Path,
    baseline: AuditResult,
    tokenizer,
    failed: dict[str, str] | None = None,
) -> Aggregate:
    """Rows, runs and baseline numbers of the finished runs of ``plan`` (see results.json); ``failed``: the runs
    that diverged -> why."""
    failed = dict(failed or {})
    shared = shared_positions(baseline, tokenizer)
    finished, runs = _finished_runs(plan, sweep_dir, baseline, failed)
    table = _sweep_table(args, runs, shared)
    rows = _rows(args, table)
    return Aggregate(
        rows=rows,
        entropy_matched=_fisher_against_entropy(rows, table),
        runs=[_run_entry(run, table.point_runs[i], run_fields(args, run.spec)) for i, run in enumerate(runs)],
        missing_runs=[spec.name for spec in plan if spec not in finished and spec.name not in failed],
        failed_runs=[FailedRun(name=name, reason=reason) for name, reason in failed.items()],
        baseline=baseline_numbers(baseline),
    )


__all__ = ["aggregate", "baseline_numbers", "SweepTable"]
