"""Aggregating a sweep: per-run numbers into rows (mean over seeds, spread, block-bootstrap interval), each run
against its control and Fisher against entropy at matched strength (paired.py), the per-run entries and the
baseline's numbers; the "rows", "runs", "entropy_matched", "missing_runs", "failed_runs" and "baseline" of
results.json. A run that diverged is a failed run: left out of every row, listed with its reason."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...audit.geometry import AuditResult
from ...errors import MRPUserError
from ...stats import BlockIndex, block_bootstrap_distribution
from ...stats.flips import finite_or_none
from ...stats.intervals import percentile_interval
from ..run_folders import run_is_whole
from .arguments import SweepArguments
from .metrics import METRIC_KEYS
from .paired import match_entropy, paired_difference
from .plan import CONTROL, RunSpec, control_name, row_keys, row_label, variant_fields
from .run_statistics import RunData, load_run, row_means, run_statistics, shared_positions, with_attributable


def _spread(values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    return {
        "std": finite_or_none(np.std(finite, ddof=1)) if finite.size > 1 else None,
        "min": finite_or_none(finite.min()) if finite.size else None,
        "max": finite_or_none(finite.max()) if finite.size else None,
    }


def _row_metrics(
    objective: str,
    member: Sequence[int],
    r: int,
    runs: Sequence[RunData],
    point_runs: np.ndarray,
    point_rows: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
) -> dict:
    """Row ``r``'s entry for every metric: mean over seeds, spread, bootstrap interval, the per-seed values."""
    metrics = {}
    for k, key in enumerate(METRIC_KEYS):
        per_seed = point_runs[list(member), k]
        if key == "net_attributable" and objective == CONTROL:
            metrics[key] = None
            continue
        has_ci = np.isfinite(low[r, k]) and np.isfinite(high[r, k])
        metrics[key] = {
            "mean": finite_or_none(point_rows[r, k]),
            **_spread(per_seed),
            "ci": [float(low[r, k]), float(high[r, k])] if has_ci else None,
            "per_seed": {str(runs[i].spec.seed): finite_or_none(v) for i, v in zip(member, per_seed)},
        }
    return metrics


def _run_entry(run: RunData, values: np.ndarray, settings: dict) -> dict:
    """``settings``: the RefineArguments fields of the run's variant (variant_fields)."""
    flip_audit = run.record["flip_audit"]
    spec = run.spec
    return {
        "name": spec.name,
        "objective": spec.objective,
        "train_objective": spec.train_objective,
        "lambda": spec.lam,
        "seed": spec.seed,
        "control": spec.control,
        "dir": f"runs/{spec.name}",
        "steps": run.record["steps"],
        "seconds": run.record["seconds"],
        "variant": spec.variant,
        "settings": settings,
        "control_run": None if spec.control else control_name(spec),
        "metrics": {key: finite_or_none(values[k]) for k, key in enumerate(METRIC_KEYS)},
        "flip_audit": {
            key: flip_audit.get(key)
            for key in ("w2r", "r2w", "net", "flip_ratio", "churn", "median_margin_change", "head_share")
        },
    }


def baseline_numbers(baseline: AuditResult) -> dict:
    summary = baseline.summary
    return {
        "dir": "baseline",
        "n_positions": summary.n_positions,
        "accuracy": summary.accuracy,
        "median_margin": summary.median_margin,
        "pr_margin_lt_0_5": summary.fraction_margin_lt_0_5,
        "gap_alpha": summary.gap_fit.alpha,
        "gap_r_squared": summary.gap_fit.r_squared,
        "blocks_sha256": summary.provenance.get("blocks_sha256"),
        "model": summary.provenance.get("model"),
    }


def aggregate(
    args: SweepArguments,
    plan: Sequence[RunSpec],
    sweep_dir: Path,
    baseline: AuditResult,
    tokenizer,
    failed: dict[str, str] | None = None,
) -> dict:
    """Rows, runs and baseline numbers of the finished runs of ``plan`` (see results.json); ``failed``: the runs
    that diverged -> why."""
    failed = dict(failed or {})
    shared = shared_positions(baseline, tokenizer)
    finished = [spec for spec in plan if run_is_whole(sweep_dir / "runs" / spec.name)]
    runs = [load_run(spec, sweep_dir / "runs" / spec.name, baseline) for spec in finished]
    if not runs:
        why = f" ({len(failed)} failed: {'; '.join(f'{k}: {v}' for k, v in failed.items())})" if failed else ""
        raise MRPUserError(
            f"no finished runs in {sweep_dir / 'runs'} to aggregate{why}; run the sweep without "
            "--aggregate_only" + (", with a lower --learning_rate" if failed else "")
        )
    position = {run.spec.name: i for i, run in enumerate(runs)}
    control_of = np.asarray([-1 if run.spec.control else position.get(control_name(run.spec), -1) for run in runs])
    keys = row_keys(args)
    members = [[position[s.name] for s in finished if (s.objective, s.lam, s.variant) == key] for key in keys]
    keys, members = zip(*[(key, m) for key, m in zip(keys, members) if m])

    point_runs = with_attributable(run_statistics(runs, shared), control_of)
    point_rows = row_means(point_runs, members)
    blocks = BlockIndex.from_labels(shared.block)
    distribution = None
    if args.n_bootstrap:
        start = time.perf_counter()
        distribution = with_attributable(
            block_bootstrap_distribution(
                lambda index: run_statistics(runs, shared, index), blocks, args.n_bootstrap, args.bootstrap_seed
            ),
            control_of,
        )
        low, high = percentile_interval(row_means(distribution, members), args.confidence)
        print(
            f"results: {args.n_bootstrap} block-bootstrap resamples of {blocks.n_blocks} blocks "
            f"({shared.n} positions) x {len(runs)} runs in {time.perf_counter() - start:.1f}s",
            flush=True,
        )
    else:
        low = high = np.full(point_rows.shape, np.nan)

    def paired(pairs: list[tuple[int, int]]) -> dict:
        return paired_difference(
            point_runs, distribution, pairs, METRIC_KEYS, [runs[a].spec.seed for a, _ in pairs], args.confidence
        )

    rows = []
    for r, ((objective, lam, variant), member) in enumerate(zip(keys, members)):
        pairs = [(i, int(control_of[i])) for i in member if control_of[i] >= 0]
        rows.append(
            {
                "objective": objective,
                "lambda": lam,
                "variant": variant,
                "control": objective == CONTROL,
                "label": row_label(objective, lam, variant, args),
                "seeds": [runs[i].spec.seed for i in member],
                "runs": [runs[i].spec.name for i in member],
                "metrics": _row_metrics(objective, member, r, runs, point_runs, point_rows, low, high),
                "vs_control": paired(pairs) if pairs and objective != CONTROL else None,
            }
        )
    matches = match_entropy(rows)
    by_seed = {key: {runs[i].spec.seed: i for i in m} for key, m in zip(keys, members)}
    for match in matches:
        fisher = by_seed[("fisher", match["reference_lambda"], "")]
        entropy = by_seed[("entropy", match["entropy_lambda"], "")]
        pairs = [(fisher[seed], entropy[seed]) for seed in sorted(set(fisher) & set(entropy))]
        match["fisher_minus_entropy"] = paired(pairs) if pairs else None  # None: no seed has both runs
    return {
        "rows": rows,
        "entropy_matched": matches,
        "runs": [_run_entry(run, point_runs[i], variant_fields(args, run.spec.variant)) for i, run in enumerate(runs)],
        "missing_runs": [spec.name for spec in plan if spec not in finished and spec.name not in failed],
        "failed_runs": [{"name": name, "reason": reason} for name, reason in failed.items()],
        "baseline": baseline_numbers(baseline),
    }


__all__ = ["aggregate", "baseline_numbers"]
