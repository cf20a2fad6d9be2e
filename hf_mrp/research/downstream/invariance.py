"""Downstream invariance decided per task: base vs base + adapter on the same items, a paired bootstrap interval of
the change, and a verdict. Pure numpy (no lm-eval import): it reads simple_evaluate's logged samples.

Paired: each resample draws items with replacement (``numpy.random.default_rng(seed).integers(0, n, (B, n))``,
the project's bootstrap convention) and both models are scored on the same drawn items, so the interval is of the
change itself, far narrower than the two models' separate standard errors suggest. Identical per-item values give
a change of exactly 0 with the interval [0, 0].

Verdict (the rule, in this order): **unchanged** when the whole 95% interval lies inside the task's band (accuracy:
+-1 point; perplexity: +-1% relative); **better** / **worse** when it excludes 0 on that side; else
**inconclusive** (the interval straddles 0 but leaves the band: too few items to tell).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...reporting.markdown import escape_cell, table
from ...stats.intervals import percentile_interval

SEED = 0
N_RESAMPLES = 2000
CONFIDENCE = 0.95
ACCURACY_BAND = 0.01  # +-1 point of accuracy, absolute
PERPLEXITY_BAND = 0.01  # +-1% of perplexity, relative
VERDICT_METRICS = ("acc_norm", "acc", "mc2", "mc1", "byte_perplexity", "word_perplexity", "perplexity")
PERPLEXITIES = ("byte_perplexity", "word_perplexity", "perplexity")  # lower is better, compared as a ratio
RULE = (
    "unchanged: the 95% paired interval lies inside the band (accuracy +-1 point, perplexity +-1% relative); "
    "better / worse: it excludes 0 on that side; else inconclusive"
)


def item_values(output: Mapping[str, Any], task: str) -> dict[str, np.ndarray]:
    """Per-item values of every verdict metric one task logged (filter "none", in doc order): accuracies as [n],
    perplexities as [n, 2] rows of (log-likelihood, count) (count 1 for a per-item perplexity)."""
    samples = sorted(
        (s for s in output.get("samples", {}).get(task, []) if s.get("filter", "none") == "none"),
        key=lambda s: s["doc_id"],
    )
    values: dict[str, np.ndarray] = {}
    for metric in VERDICT_METRICS:
        if not samples or metric not in samples[0]:
            continue
        column = [s[metric] for s in samples]
        if metric in PERPLEXITIES:
            rows = [(v[0], v[1]) if isinstance(v, (list, tuple)) else (v, 1.0) for v in column]
            values[metric] = np.asarray(rows, dtype=np.float64).reshape(-1, 2)
        else:
            values[metric] = np.asarray(column, dtype=np.float64)
    return values


def verdict(low: float, high: float, band: float, higher_is_better: bool) -> str:
    """The verdict of one change interval [low, high] (see the module docstring for the rule)."""
    if -band <= low and high <= band:
        return "unchanged"
    if low > 0 or high < 0:
        return "better" if (low > 0) == higher_is_better else "worse"
    return "inconclusive"


def _perplexity(rows: np.ndarray) -> float:
    return float(np.exp(-rows[:, 0].sum() / rows[:, 1].sum()))


def task_invariance(metric: str, base: np.ndarray, adapter: np.ndarray, n_resamples: int, seed: int) -> dict:
    """Paired bootstrap of one task's change: absolute for an accuracy, relative (ratio - 1) for a perplexity."""
    n = len(base)
    draws = np.random.default_rng(seed).integers(0, n, (n_resamples, n))
    relative = metric in PERPLEXITIES
    if relative:  # the same text for both: counts agree, the change is exp(-sum(ll_a - ll_b) / sum(count)) - 1
        difference, counts = adapter[:, 0] - base[:, 0], base[:, 1]
        change = float(np.expm1(-difference.sum() / counts.sum()))
        samples = np.expm1(-difference[draws].sum(axis=1) / counts[draws].sum(axis=1))
        scores = (_perplexity(base), _perplexity(adapter))
        changed = int(np.count_nonzero(difference))
    else:
        difference = adapter - base
        change = float(difference.mean())
        samples = difference[draws].mean(axis=1)
        scores = (float(base.mean()), float(adapter.mean()))
        changed = int(np.count_nonzero(difference))
    low, high = percentile_interval(samples, CONFIDENCE)
    band = PERPLEXITY_BAND if relative else ACCURACY_BAND
    return {
        "metric": metric,
        "change": "relative" if relative else "absolute",
        "n_items": n,
        "items_changed": changed,
        "base": scores[0],
        "adapter": scores[1],
        "delta": change,
        "interval": [float(low), float(high)],
        "band": [-band, band],
        "higher_is_better": not relative,
        "verdict": verdict(float(low), float(high), band, not relative),
    }


def decide_invariance(
    base: Mapping[str, Any],
    adapter: Mapping[str, Any],
    tasks: Sequence[str],
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> dict:
    """The verdict of every task whose logged samples hold a verdict metric (the first of VERDICT_METRICS)."""
    rows = {}
    for task in tasks:
        base_values, adapter_values = item_values(base, task), item_values(adapter, task)
        metric = next((m for m in VERDICT_METRICS if m in base_values and m in adapter_values), None)
        if metric is not None and len(base_values[metric]) == len(adapter_values[metric]) > 0:
            rows[task] = task_invariance(metric, base_values[metric], adapter_values[metric], n_resamples, seed)
    verdicts = [row["verdict"] for row in rows.values()]
    counts = {name: verdicts.count(name) for name in ("unchanged", "better", "worse", "inconclusive")}
    return {"rule": RULE, "confidence": CONFIDENCE, "n_resamples": n_resamples, "seed": seed} | {
        "tasks": rows,
        "verdicts": counts,
    }


def _scaled(row: Mapping[str, Any], value: float) -> str:
    """A change in its unit: points of accuracy, or percent of perplexity."""
    return f"{100 * value:+.2f}{' pt' if row['change'] == 'absolute' else '%'}"


def invariance_markdown(result: Mapping[str, Any], heading: str = "##") -> str:
    """The verdict table: one row per task, the change with its interval in points or percent."""
    rows = [
        [
            escape_cell(name),
            escape_cell(row["metric"]),
            str(row["n_items"]),
            f"{row['base']:.4f}",
            f"{row['adapter']:.4f}",
            f"{_scaled(row, row['delta'])} [{_scaled(row, row['interval'][0])}, {_scaled(row, row['interval'][1])}]",
            f"+-{_scaled(row, row['band'][1])[1:]}",
            str(row["items_changed"]),
            f"**{row['verdict']}**",
        ]
        for name, row in result["tasks"].items()
    ]
    header = ["task", "metric", "items", "base", "adapter", "change [95% paired interval]", "band", "items changed"]
    return "\n".join(
        [
            f"{heading} Invariance: base vs base + adapter, item by item",
            "",
            table([*header, "verdict"], rows),
            "",
            f"Paired bootstrap over items ({result['n_resamples']:,} resamples, seed {result['seed']}); "
            f"verdict rule: {result['rule']}. Perplexity changes are relative (lower is better).",
            "",
        ]
    )


def plot_invariance(result: Mapping[str, Any], path: str | Path) -> None:
    """invariance.png: each task's change with its 95% interval against its band (points or percent)."""
    from ...reporting.plots import pyplot, save_figure

    plt = pyplot()
    names = list(result["tasks"])
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.6))
    for index, name in enumerate(names):
        row = result["tasks"][name]
        low, high = (100 * value for value in row["interval"])
        band = 100 * row["band"][1]
        ax.fill_betweenx([index - 0.35, index + 0.35], -band, band, color="0.88", lw=0)
        color = {"unchanged": "C2", "better": "C0", "worse": "C3"}.get(row["verdict"], "C7")
        ax.errorbar(100 * row["delta"], index, xerr=[[100 * row["delta"] - low], [high - 100 * row["delta"]]],
                    fmt="o", color=color, capsize=4, label=row["verdict"])  # fmt: skip
    ax.axvline(0, color="0.3", lw=0.8)
    unit = lambda n: "pt" if result["tasks"][n]["change"] == "absolute" else "% ppl"  # noqa: E731
    ax.set_yticks(range(len(names)), [f"{n}\n{result['tasks'][n]['metric']} ({unit(n)})" for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("adapter - base: accuracy points, or perplexity % (grey: the band of 'unchanged')")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        ax.legend(unique.values(), unique.keys(), loc="best", fontsize=8)
    ax.set_title("Downstream invariance, paired 95% intervals")
    save_figure(fig, path)
