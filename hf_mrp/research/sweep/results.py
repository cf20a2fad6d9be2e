"""results.json of a sweep as typed records: the head (what was swept, how), the rows, the runs, the baseline.

Every reader (results.md, the plots, the paper table, the console summary) takes attributes (``row.metrics``,
``results.head.positions.n``), so a renamed field fails at type-check time instead of printing "n/a". One
`JsonRecord.to_json` writes them all: the fields in order, under their names (``lam`` as "lambda"), the records
of an ``inline`` field merged into their parent; the keys and their order are results.json's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

LAMBDA = {"json": "lambda"}  # the metadata of a field ``lam``: JSON has "lambda", a Python keyword
INLINE = {"inline": True}  # the metadata of a field whose record's keys are written into its parent's


@dataclass
class JsonRecord:
    """A dataclass that results.json holds; `to_json` is the one way any of them is written."""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = _json_value(getattr(self, item.name))
            if item.metadata.get("inline"):
                data.update(value)
            else:
                data[item.metadata.get("json", item.name)] = value
        return data


def _json_value(value: Any) -> Any:
    if isinstance(value, JsonRecord):
        return value.to_json()
    if isinstance(value, dict):
        return {key: _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    return value


@dataclass
class MetricSummary(JsonRecord):
    """One number of a row: the mean over its seeds, their spread, the block-bootstrap interval, each seed's."""

    mean: float | None
    std: float | None  # ddof = 1; None with one seed
    min: float | None
    max: float | None
    ci: list[float] | None  # None without bootstrap or where undefined
    per_seed: dict[str, float | None]  # seed (as text) -> the run's value


@dataclass
class PairedDifference(JsonRecord):
    """metric(run a) - metric(run b), mean over the pairs (one per seed), with paired and over-seeds intervals."""

    mean: float | None
    per_seed: dict[str, float | None]
    ci: list[float] | None  # paired block bootstrap: both runs on the same resample
    seed_ci: list[float] | None  # Student t over the per-seed differences; None with one pair


@dataclass
class Row(JsonRecord):
    """One row of the dose-response table: an objective at one lambda (and variant), over its seeds."""

    objective: str  # an objective, or "control"
    lam: float = field(metadata=LAMBDA)
    variant: str  # "", "head" or "target"
    control: bool
    label: str
    seeds: list[int]
    runs: list[str]
    metrics: dict[str, MetricSummary | None]  # None: net_attributable of a control
    vs_control: dict[str, PairedDifference] | None  # None: a control, or no finished control

    def mean(self, key: str) -> float | None:
        entry = self.metrics[key]
        return None if entry is None else entry.mean


@dataclass
class EntropyMatch(JsonRecord):
    """A fisher lambda, the entropy lambda of the closest median margin change, and their paired differences."""

    reference: str
    reference_lambda: float
    reference_value: float
    entropy_lambda: float
    entropy_value: float
    gap: float  # entropy_value - reference_value
    matched_on: str
    fisher_minus_entropy: dict[str, PairedDifference] | None = None  # None: no seed has both runs


@dataclass
class FlipHeadline(JsonRecord):
    """The headline of a run's own comparison/flip_audit.json (None where that file lacks a key)."""

    w2r: int | None
    r2w: int | None
    net: int | None
    flip_ratio: float | None
    churn: float | None
    median_margin_change: float | None
    head_share: float | None

    @classmethod
    def from_flip_audit(cls, flip_audit: dict[str, Any]) -> FlipHeadline:
        return cls(**{item.name: flip_audit.get(item.name) for item in dataclasses.fields(cls)})


@dataclass
class RunEntry(JsonRecord):
    """One finished run: what it was, how long it trained, its numbers on all audited positions."""

    name: str
    objective: str
    train_objective: str
    lam: float = field(metadata=LAMBDA)
    seed: int
    control: bool
    dir: str
    steps: int | None
    seconds: float | None
    variant: str
    settings: dict[str, Any]  # the run fields of its variant (plan.run_fields)
    control_run: str | None
    metrics: dict[str, float | None]
    flip_audit: FlipHeadline


@dataclass
class FailedRun(JsonRecord):
    name: str
    reason: str


@dataclass
class BaselineNumbers(JsonRecord):
    """The shared "before" audit's numbers."""

    dir: str
    n_positions: int
    accuracy: float
    median_margin: float
    pr_margin_lt_0_5: float
    gap_alpha: float
    gap_r_squared: float
    blocks_sha256: str | None
    model: str | None
    gap_beta: float | None = None
    entropy_margin_rho: float | None = None


@dataclass
class Aggregate(JsonRecord):
    """What the finished runs add up to (aggregate.py)."""

    rows: list[Row]
    entropy_matched: list[EntropyMatch]
    runs: list[RunEntry]
    missing_runs: list[str]
    failed_runs: list[FailedRun]
    baseline: BaselineNumbers


@dataclass
class ControlSettings(JsonRecord):
    objective: str  # carried at weight 0
    lam: float = field(metadata=LAMBDA)
    runs: list[str]
    note: str


@dataclass
class Positions(JsonRecord):
    """The audited positions every run is compared on."""

    n: int
    holdout: bool
    held_out_from_training: bool
    block_size: int
    n_blocks: int
    blocks_sha256: str
    source: str


@dataclass
class Training(JsonRecord):
    """The training settings every run shares."""

    max_steps: int
    num_train_epochs: float
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    block_size: int
    max_positions: int
    use_lora: bool
    lora_r: int
    lora_layers: str | None
    mrp_margin_normalization: str | None


@dataclass
class Bootstrap(JsonRecord):
    n_resamples: int
    confidence: float
    seed: int
    method: str
    paired: str


@dataclass
class SweepHead(JsonRecord):
    """What was swept, over which positions, with which training and statistics (command.describe_sweep)."""

    command: str
    objectives: list[str]
    lambdas: list[float]
    seeds: list[int]
    control: ControlSettings
    positions: Positions
    training: Training
    bootstrap: Bootstrap
    variants: dict[str, dict[str, Any]]  # name -> objective, lambdas, settings, control_settings, control
    entropy_lambdas: list[float] | None
    objective_lambdas: dict[str, list[float]]  # --objective_lambdas: objective -> its own grid
    spread: str
    metrics: dict[str, dict[str, str]]  # key -> header, description


@dataclass
class SweepResults(JsonRecord):
    """results.json: the head, the runs this call trained, the aggregate, the plots' files."""

    head: SweepHead = field(metadata=INLINE)
    executed_now: list[str]
    engine: dict[str, Any]  # {"name": "ray", "version": ..., "address": ...} (engine.engine_record)
    aggregate: Aggregate = field(metadata=INLINE)
    plots: dict[str, str] = field(default_factory=dict)


__all__ = [
    "JsonRecord",
    "MetricSummary",
    "PairedDifference",
    "Row",
    "EntropyMatch",
    "FlipHeadline",
    "RunEntry",
    "FailedRun",
    "BaselineNumbers",
    "Aggregate",
    "ControlSettings",
    "Positions",
    "Training",
    "Bootstrap",
    "SweepHead",
    "SweepResults",
]
