"""Per-position data of a sweep and the per-run numbers computed from it, on all positions or a resample.

Every flip number is `hf_mrp.stats.flips.flip_numbers`, the function `hf-mrp compare` uses, applied to the
baseline's and the run's per-position columns (indexed by a block-bootstrap resample, or whole).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...audit.compare import check_same_positions, decoder_from_tokenizer
from ...audit.geometry import AuditResult, load_audit
from ...ops.gap import fit_gap_law
from ...stats.correlation import spearman
from ...stats.flips import flip_numbers, none_to_nan
from ...stats.token_classes import HEAD_BUCKET, target_buckets, target_class_codes
from ...storage import files
from ..run_folders import TRAINING_LOG
from .metrics import METRIC_KEYS, PER_RUN_METRICS
from .plan import RunSpec
from .results import FlipHeadline
from .runs import RUN_RECORD


@dataclass
class Shared:
    """What every run of the sweep shares: the baseline's per-position columns and target groups."""

    margin_before: np.ndarray
    correct_before: np.ndarray
    top1_before: np.ndarray
    head: np.ndarray  # target counted 100+ times in the audited blocks
    class_code: np.ndarray  # index into CLASSES of the decoded target
    block: np.ndarray  # the audited block of each position (the bootstrap resamples whole blocks)

    @property
    def n(self) -> int:
        return int(self.margin_before.size)


@dataclass
class RunData:
    """One finished run: its after-audit's per-position columns and what its folder records."""

    spec: RunSpec
    margin_after: np.ndarray
    entropy_after: np.ndarray
    correct_after: np.ndarray
    top1_after: np.ndarray
    steps: int | None  # the last logged step (None: no training log)
    seconds: float | None  # wall time of the run (None: no run record)
    flip_audit: FlipHeadline  # the run's own comparison/flip_audit.json headline


def shared_positions(baseline: AuditResult, tokenizer) -> Shared:
    positions = baseline.positions
    target = np.asarray(positions["target_id"], dtype=np.int64)
    return Shared(
        margin_before=np.asarray(positions["margin"], dtype=np.float64),
        correct_before=np.asarray(positions["correct"]).astype(bool),
        top1_before=np.asarray(positions["top1_id"], dtype=np.int64),
        head=target_buckets(baseline.blocks.input_ids, target) == HEAD_BUCKET,
        class_code=target_class_codes(target, decoder_from_tokenizer(tokenizer)),
        block=np.asarray(positions["block"], dtype=np.int64),
    )


def load_run(spec: RunSpec, run_dir: Path, baseline: AuditResult) -> RunData:
    after = load_audit(run_dir / "audit_after")
    check_same_positions(baseline, after)
    log = run_dir / TRAINING_LOG
    steps = max((int(entry.get("step", 0)) for entry in files.read_json(log)), default=0) if log.is_file() else None
    seconds = files.read_json(run_dir / RUN_RECORD).get("seconds") if (run_dir / RUN_RECORD).is_file() else None
    return RunData(
        spec=spec,
        margin_after=np.asarray(after.positions["margin"], dtype=np.float64),
        entropy_after=np.asarray(after.positions["entropy"], dtype=np.float64),
        correct_after=np.asarray(after.positions["correct"]).astype(bool),
        top1_after=np.asarray(after.positions["top1_id"], dtype=np.int64),
        steps=steps,
        seconds=seconds,
        flip_audit=FlipHeadline.from_flip_audit(files.read_json(run_dir / "comparison" / "flip_audit.json")),
    )


def run_statistics(runs: Sequence[RunData], shared: Shared, index: np.ndarray | None = None) -> np.ndarray:
    """[runs, PER_RUN_METRICS] for the positions ``index`` (a bootstrap resample; None: all positions)."""
    pick = slice(None) if index is None else index
    correct, margin_before, top1 = shared.correct_before[pick], shared.margin_before[pick], shared.top1_before[pick]
    head, codes = shared.head[pick], shared.class_code[pick]
    table = np.empty((len(runs), len(PER_RUN_METRICS)))
    for row, run in enumerate(runs):
        margin = run.margin_after[pick]
        numbers = flip_numbers(
            correct, run.correct_after[pick], margin_before, margin, top1, run.top1_after[pick], head, codes
        )
        net_by_class, share_of_net = numbers.net_by_class, numbers.share_of_net
        assert net_by_class is not None and share_of_net is not None  # flip_numbers computes them from class codes
        fit = fit_gap_law(margin)
        values = {
            **numbers.to_json(),
            "median_margin": numbers.median_margin_after,
            "pr_margin_lt_0_5": float(np.mean(margin < 0.5)),
            "gap_alpha": fit.alpha,
            "gap_r_squared": fit.r_squared,
            "gap_beta": fit.beta,
            "entropy_margin_rho": spearman(run.entropy_after[pick], margin),
            "accuracy": numbers.accuracy_after,
            "structural_share": share_of_net["structural"],
            **{f"net_{label}": net for label, net in net_by_class.items()},
        }
        table[row] = [none_to_nan(values[key]) for key, _, _ in PER_RUN_METRICS]
    return table


def with_attributable(table: np.ndarray, control_of: np.ndarray) -> np.ndarray:
    """Append net(run) - net(control of its seed) to [..., runs, PER_RUN_METRICS] (NaN: control or none)."""
    net = table[..., METRIC_KEYS.index("net")]
    padded = np.concatenate([net, np.full(net.shape[:-1] + (1,), np.nan)], axis=-1)  # index -1: no control
    attributable = net - padded[..., control_of]
    return np.concatenate([table, attributable[..., None]], axis=-1)


def row_means(table: np.ndarray, members: Sequence[Sequence[int]]) -> np.ndarray:
    """[..., rows, METRICS]: the mean over each row's runs (seeds), ignoring undefined values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a metric undefined in every seed stays NaN
        return np.stack([np.nanmean(table[..., list(m), :], axis=-2) for m in members], axis=-2)


__all__ = ["Shared", "RunData", "shared_positions", "load_run", "run_statistics", "with_attributable", "row_means"]
