"""The downstream report: per-task headline metric (the spec's rule), deltas adapter minus base, their mean,
as downstream.json / downstream.md and one summary line. Pure: no lm-eval import."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...reporting.markdown import escape_cell, fmt_number, table
from ...storage.files import write_json, write_text
from .invariance import decide_invariance, invariance_markdown, plot_invariance

METRIC_PREFERENCE = ("acc_norm", "acc", "mc2", "mc1")
METRIC_RULE = "acc_norm, else acc, else mc2, else mc1"
DEFAULT_FILTER = "none"  # the lm-eval filter whose metrics are read


def select_metric(metrics: Mapping[str, Any]) -> str | None:
    """The headline metric of a task by the spec's rule: acc_norm, else acc, else mc2, else mc1.

    acc_norm comes first because length-normalised accuracy is the paper's score wherever lm-eval
    reports it (ARC, HellaSwag, PIQA); None when the task has none of the four (e.g. only perplexity).
    """
    return next((name for name in METRIC_PREFERENCE if _is_number(metrics.get(name))), None)


def metric_values(row: Mapping[str, Any]) -> dict[str, float]:
    """Numeric metrics of one lm-eval result row: 'acc,none' -> 'acc'; other filters keep 'metric,filter'."""
    return {
        _metric_name(key): float(value)
        for key, value in row.items()
        if "," in key and "_stderr," not in key and _is_number(value)
    }


def stderr_values(row: Mapping[str, Any]) -> dict[str, float]:
    """Standard errors of one lm-eval result row, keyed like metric_values ('N/A' entries dropped)."""
    return {
        _metric_name(key.replace("_stderr,", ",")): float(value)
        for key, value in row.items()
        if "_stderr," in key and _is_number(value)
    }


def _metric_name(key: str) -> str:
    name, _, filter_name = key.partition(",")
    return name if filter_name == DEFAULT_FILTER else key


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def task_row(base: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict[str, Any]:
    """One task of the report from the two lm-eval result rows: headline metric, scores, delta, all metrics."""
    base_metrics, adapter_metrics = metric_values(base), metric_values(adapter)
    metric = select_metric(base_metrics)
    if metric is not None and metric not in adapter_metrics:
        metric = None
    base_err, adapter_err = stderr_values(base), stderr_values(adapter)
    score = (lambda values: values.get(metric)) if metric else (lambda values: None)
    return {
        "metric": metric,
        "base": score(base_metrics),
        "adapter": score(adapter_metrics),
        "delta": adapter_metrics[metric] - base_metrics[metric] if metric else None,
        "base_stderr": score(base_err),
        "adapter_stderr": score(adapter_err),
        "metrics": {"base": base_metrics, "adapter": adapter_metrics},
    }


def mean_row(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over the tasks that have a headline metric (the paper's six-task mean)."""
    scored = [row for row in tasks.values() if row["metric"] is not None]
    if not scored:
        return {"base": None, "adapter": None, "delta": None, "n_tasks": 0}
    mean = lambda key: sum(row[key] for row in scored) / len(scored)  # noqa: E731
    return {"base": mean("base"), "adapter": mean("adapter"), "delta": mean("delta"), "n_tasks": len(scored)}


def build_report(
    base: Mapping[str, Any], adapter: Mapping[str, Any], provenance: Mapping[str, Any], names: Sequence[str] = ()
) -> dict:
    """The downstream.json content from two simple_evaluate outputs (same tasks, same order); with their logged
    samples, the per-task invariance verdicts (invariance.py) too. An offline-suite run (provenance ``suite``)
    reports no mean: its tasks are a proxy, never the paper's six-task mean."""
    tasks = {}
    for name, row in base["results"].items():
        tasks[name] = task_row(row, adapter["results"].get(name, {}))
        tasks[name]["n_samples"] = base.get("n-samples", {}).get(name, {}).get("effective")
        tasks[name]["higher_is_better"] = base.get("higher_is_better", {}).get(name, {})
    report: dict[str, Any] = {"provenance": dict(provenance), "metric_rule": METRIC_RULE, "tasks": tasks}
    report["mean"] = None if provenance.get("suite") else mean_row(tasks)
    if "samples" in base and "samples" in adapter:
        report["invariance"] = decide_invariance(base, adapter, list(names) or list(tasks))
    return report


def report_markdown(report: Mapping[str, Any]) -> str:
    """downstream.md: one row per task and the mean, deltas signed, in points of the metric."""
    fmt_delta = lambda value: "n/a" if value is None else f"{value:+.4f}"  # noqa: E731
    rows = [
        [
            escape_cell(name),
            escape_cell(row["metric"] or "n/a"),
            fmt_number(row["base"], 4),
            fmt_number(row["adapter"], 4),
            fmt_delta(row["delta"]),
            fmt_number(row["base_stderr"], 4),
            str(row["n_samples"] or "n/a"),
        ]
        for name, row in report["tasks"].items()
    ]
    mean = report["mean"]
    if mean is not None:
        rows.append(
            [f"**mean ({_tasks(mean['n_tasks'])})**", "", fmt_number(mean["base"], 4), fmt_number(mean["adapter"], 4)]
            + [fmt_delta(mean["delta"]), "", ""]
        )
    origin = report["provenance"]
    suite = origin.get("suite")
    proxy = [f"- the {suite} suite: an offline proxy, not the paper's six tasks (no mean is reported)"] if suite else []
    verdicts = [invariance_markdown(report["invariance"])] if report.get("invariance") else []
    return "\n".join(
        [
            "# Downstream invariance: base vs base + adapter",
            "",
            *proxy,
            f"- base model: {escape_cell(str(origin.get('model')))}",
            f"- adapter: {escape_cell(str(origin.get('adapter')))}",
            f"- lm-evaluation-harness {origin.get('versions', {}).get('lm_eval')}, zero-shot, "
            f"limit {origin.get('arguments', {}).get('limit') or 'none'}",
            f"- metric per task: {METRIC_RULE}; delta = adapter - base",
            "",
            table(["task", "metric", "base", "adapter", "delta", "base stderr", "examples"], rows),
            "",
            *verdicts,
        ]
    )


def _tasks(count: int) -> str:
    return f"{count} task" if count == 1 else f"{count} tasks"


def summary_line(report: Mapping[str, Any]) -> str:
    """The one line `hf-mrp downstream` prints: mean delta first, then each task's delta (for the offline suite,
    which has no mean: each task's verdict)."""
    mean = report["mean"]
    if mean is None:
        verdicts = report.get("invariance", {}).get("tasks", {})
        parts = [f"{name} {row['verdict']} ({row['metric']} {row['delta']:+.4f})" for name, row in verdicts.items()]
        return f"{report['provenance'].get('suite')} suite (a proxy, not the paper's six tasks): " + ", ".join(parts)
    if mean["n_tasks"] == 0:
        return "no task reported acc_norm, acc, mc2 or mc1; see downstream.json for the metrics lm-eval gave"
    parts = [f"{name} {row['delta']:+.4f}" for name, row in report["tasks"].items() if row["delta"] is not None]
    return (
        f"mean delta {mean['delta']:+.4f} over {_tasks(mean['n_tasks'])} "
        f"(base {mean['base']:.4f} -> adapter {mean['adapter']:.4f}): " + ", ".join(parts)
    )


def write_report(report: Mapping[str, Any], output_dir: str | Path) -> None:
    write_json(Path(output_dir) / "downstream.json", report)
    write_text(Path(output_dir) / "downstream.md", report_markdown(report))
    if report.get("invariance", {}).get("tasks"):
        plot_invariance(report["invariance"], Path(output_dir) / "invariance.png")
