"""paper_curves.png and paper_protocol.json of a `--preset paper` run (or `--paper_curves true`): this run's training
curves (loss_ce, loss_mrp, grad_norm per logged step) drawn over the paper's released runs', and every setting
where this run departs from the released protocol (the released run files, released_runs.json), so a reader
knows what a difference between the curves can and cannot be blamed on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...reporting.plots import legend, pyplot, save_figure
from ...storage import files
from .released_runs import CURVE_KEYS, released_runs

TITLES = {"loss_ce": "cross-entropy", "loss_mrp": "MRP penalty", "grad_norm": "gradient norm"}
WINDOW_GAP = 10  # released curves are windows of the log: steps further apart than this are not joined


def curve_of(log_history: Sequence[dict]) -> dict[str, list[float]]:
    """{"step": [...], "loss_ce": [...], ...} of the Trainer's logged steps that hold all three keys."""
    rows = [row for row in log_history if all(key in row for key in CURVE_KEYS) and "step" in row]
    return {"step": [float(row["step"]) for row in rows], **{k: [float(row[k]) for row in rows] for k in CURVE_KEYS}}


def _windows(steps: Sequence[float], values: Sequence[float]) -> list[tuple[list[float], list[float]]]:
    """Runs of consecutive points no more than WINDOW_GAP steps apart."""
    windows: list[tuple[list[float], list[float]]] = []
    for step, value in zip(steps, values):
        if not windows or step - windows[-1][0][-1] > WINDOW_GAP:
            windows.append(([], []))
        windows[-1][0].append(step)
        windows[-1][1].append(value)
    return windows


def plot_paper_curves(path: str | Path, curve: dict[str, list[float]], departures: Sequence[dict]) -> None:
    """Three panels against the step: each released run's sampled curve (thin, one colour per run) and this
    run's (thick, black); the departures from the released protocol listed under them."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    released = [run for run in released_runs() if run.curve is not None]
    for ax, key in zip(axes, CURVE_KEYS):
        for index, run in enumerate(released):
            assert run.curve is not None  # filtered above
            for number, (steps, values) in enumerate(_windows(run.curve["step"], run.curve[key])):
                ax.plot(
                    steps, values, color=f"C{index}", lw=0.8, marker=".", ms=3, label=run.label if not number else None
                )
        ax.plot(curve["step"], curve[key], color="black", lw=2, marker="o", ms=3, label="this run")
        ax.set_title(TITLES[key])
        ax.set_xlabel("step")
    legend(axes[0], fontsize=7)
    lines = [f"{item['setting']}: released {item['released']}, here {item['this_run']}" for item in departures]
    fig.text(
        0.01, 0.01, "Departures from the released protocol: " + ("; ".join(lines) or "none"), fontsize=7, wrap=True
    )
    fig.suptitle("Training curves over the paper's released runs (mellowmarshall/mrp-paper, released_runs.json)")
    fig.subplots_adjust(bottom=0.25)
    save_figure(fig, path)


def departures(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Where ``run`` (its model, steps, data, settings) differs from the released protocol: the settings of
    run 4's train_summary.json, the run the paper preset follows (released_runs.json ``protocol``)."""
    protocol = next(entry.protocol for entry in released_runs() if entry.run == "run4_marginmax_1.0")
    assert protocol is not None  # run 4's settings are in the data file
    released = {
        "model": protocol["model_id"],
        "max_steps": protocol["max_steps"],
        "learning_rate": protocol["learning_rate"],
        "block_size": protocol["block_size"],
        "dataset_config": protocol["dataset_config"],
        "bf16": protocol["bf16"],
        "effective_batch_blocks": 16,
        "full_model": True,
        "audit_positions": 256_577,
    }
    found = []
    for setting, value in released.items():
        here = run.get(setting)
        if here != value:
            found.append({"setting": setting, "released": value, "this_run": here})
    return found


def write_paper_curves(output_dir: Path, log_history: Sequence[dict], run: dict[str, Any]) -> dict[str, Path]:
    """paper_curves.png and paper_protocol.json (the departures, this run's curve) into ``output_dir``."""
    curve, found = curve_of(log_history), departures(run)
    paths = {"paper_curves": output_dir / "paper_curves.png", "paper_protocol": output_dir / "paper_protocol.json"}
    plot_paper_curves(paths["paper_curves"], curve, found)
    files.write_json(paths["paper_protocol"], {"departures": found, "this_run": run, "curve": curve})
    return paths


__all__ = ["curve_of", "departures", "plot_paper_curves", "write_paper_curves"]
