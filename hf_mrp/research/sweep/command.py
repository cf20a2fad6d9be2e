"""`hf-mrp sweep` from end to end: plan, run (or resume) the unfinished runs on Ray (engine.py), aggregate, report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...audit.geometry import AuditResult
from ...storage import files
from ...storage.locks import current_command, owned_folder
from ..run_folders import run_is_whole
from .aggregate import aggregate
from .arguments import SweepArguments
from .engine import engine_record, ray_engine, require_ray, run_grid
from .metrics import DESCRIPTIONS, HEADERS, METRIC_KEYS
from .plan import TARGET, RunSpec, plan_runs, run_fields, sweep_variants
from .report import markdown_report, write_plots
from .results import Bootstrap, ControlSettings, Positions, SweepHead, SweepResults, Training
from .runs import (
    RunArguments,
    check_finished_runs,
    check_settings,
    default_settings,
    ensure_baseline,
    failed_reason,
    record_settings,
    run_arguments,
    run_settings,
)
from .variants import control_fields, control_note


def run_sweep(args: SweepArguments, shared: RunArguments, command: str | None = None) -> SweepResults:
    """Run (or resume) the sweep and write results.json, results.md and the plots; returns the results.

    ``shared``: the settings every run starts from (`hf-mrp sweep` parses them from the pass-through flags, as
    `hf-mrp refine` does); each run is ``shared`` with its own fields replaced (run_arguments). ``command``: what
    results.json records (default: this process's command line)."""
    command = command or current_command()
    if not args.aggregate_only:
        require_ray()  # not installed: one line saying how, before any work
    sweep_dir = Path(args.output_dir)
    plan = plan_runs(args)
    arguments = {
        spec.name: run_arguments(
            shared,
            spec,
            sweep_dir / "runs" / spec.name,  # bad flags fail here,
            run_fields(args, spec),
        )
        for spec in plan
    }  # before any work
    sweep_dir = files.ensure_output_dir(sweep_dir)
    with owned_folder(sweep_dir, command):  # one sweep at a time per folder
        return _run_owned_sweep(args, command, plan, sweep_dir, arguments)


def _run_owned_sweep(
    args: SweepArguments, command: str, plan: list[RunSpec], sweep_dir: Path, arguments: dict[str, RunArguments]
) -> SweepResults:
    settings = run_settings(arguments[plan[0].name])  # the first control's: every run shares them
    defaults = default_settings(arguments[plan[0].name])  # settings added to hf_mrp since a record was written
    check_settings(sweep_dir, settings, defaults)
    check_finished_runs(sweep_dir, arguments, defaults)
    tokenizer, baseline = ensure_baseline(sweep_dir, arguments[plan[0].name])
    record_settings(sweep_dir, settings, command)

    todo, failed = unfinished_runs(args, plan, sweep_dir)
    executed: list[str] = []
    address = None
    if todo:
        with ray_engine(args) as address:
            executed, failed_now = run_grid(args, todo, arguments, sweep_dir.resolve(), len(plan))
        failed.update(failed_now)
    results = SweepResults(
        head=describe_sweep(args, command, plan, arguments[plan[0].name], baseline),
        executed_now=executed,
        engine=engine_record(address),
        aggregate=aggregate(args, plan, sweep_dir, baseline, tokenizer, failed),
    )
    results.plots = write_plots(sweep_dir, results)
    files.write_text(sweep_dir / "results.md", markdown_report(results))
    files.write_json(sweep_dir / "results.json", results.to_json())  # last: its presence marks a complete report
    return results


def unfinished_runs(args: SweepArguments, plan: list[RunSpec], sweep_dir: Path) -> tuple[list[RunSpec], dict]:
    """(the runs to train now, {run: why it failed} for runs that diverged in an earlier call). A finished run is
    kept as it is; one that diverged is kept as failed (it would diverge again: delete its folder to redo it); any
    other is trained from scratch (none with --aggregate_only)."""
    todo, failed = [], {}
    for number, spec in enumerate(plan, 1):
        run_dir = sweep_dir / "runs" / spec.name
        finished = run_is_whole(run_dir)  # reads the run's audit back: once
        reason = None if finished else failed_reason(run_dir)
        if finished:
            print(f"[{number}/{len(plan)}] skipping finished run {spec.name}", flush=True)
        elif reason is not None:
            failed[spec.name] = reason
            print(
                f"[{number}/{len(plan)}] skipping failed run {spec.name} (delete {run_dir} to redo it): {reason}",
                flush=True,
            )
        elif args.aggregate_only:
            print(f"[{number}/{len(plan)}] not finished, left out: {spec.name}", flush=True)
        else:
            if run_dir.exists():
                print(f"[{number}/{len(plan)}] redoing unfinished run {spec.name} from scratch", flush=True)
            todo.append(spec)
    return todo, failed


def describe_sweep(
    args: SweepArguments, command: str, plan: list[RunSpec], arguments: RunArguments, baseline: AuditResult
) -> SweepHead:
    """The head of results.json: what was swept, over which positions, with which training and statistics."""
    return SweepHead(
        command=command,
        objectives=args.objectives,
        lambdas=args.lambdas,
        seeds=args.seeds,
        control=ControlSettings(
            objective=args.control_objective,
            lam=0.0,
            runs=[spec.name for spec in plan if spec.control],
            note="cross-entropy only: same data, steps, adapter and seed as the runs of its seed",
        ),
        positions=_positions(arguments, baseline),
        training=_training(arguments),
        bootstrap=_bootstrap(args),
        variants=_variants(args),
        entropy_lambdas=args.entropy_lambdas,
        objective_lambdas=dict(args.grids),
        spread="over seeds: std (ddof = 1), min, max",
        metrics={key: {"header": HEADERS[key], "description": DESCRIPTIONS[key]} for key in METRIC_KEYS},
    )


def _positions(arguments: RunArguments, baseline: AuditResult) -> Positions:
    holdout = bool(arguments.refine.holdout)
    return Positions(
        n=int(baseline.summary.n_positions),
        holdout=holdout,
        held_out_from_training=holdout,
        block_size=int(baseline.blocks.block_size),
        n_blocks=int(len(baseline.blocks.input_ids)),
        blocks_sha256=baseline.blocks.fingerprint(),
        source=baseline.blocks.source,
    )


def _training(arguments: RunArguments) -> Training:
    data_args, config = arguments.data, arguments.config
    return Training(
        max_steps=config.max_steps,
        num_train_epochs=config.num_train_epochs,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        block_size=data_args.block_size,
        max_positions=data_args.max_positions,
        use_lora=config.use_lora,
        lora_r=config.lora_r,
        lora_layers=config.lora_layers,
        mrp_margin_normalization=getattr(config, "mrp_margin_normalization", None),
    )


def _bootstrap(args: SweepArguments) -> Bootstrap:
    return Bootstrap(
        n_resamples=args.n_bootstrap,
        confidence=args.confidence,
        seed=args.bootstrap_seed,
        method="percentile block (cluster) bootstrap: each resample draws the audited blocks with "
        "replacement and keeps every position of a drawn block; every run is resampled with the same "
        "blocks; a row's statistic is the mean over its seeds",
        paired="vs_control and fisher_minus_entropy: differences taken on the same resample for both runs; "
        "seed_ci: Student t interval of the per-seed differences (n_seeds - 1 degrees of freedom)",
    )


def _variants(args: SweepArguments) -> dict[str, dict[str, Any]]:
    """Each variant: its objective, lambdas, settings, and what its rows are paired with."""
    described = {}
    for variant in sweep_variants(args):
        described[variant.name] = {
            "objective": variant.objective,
            "lambdas": list(variant.lambdas),
            **({"classes": args.target_classes, "buckets": args.target_buckets} if variant.name == TARGET else {}),
            "settings": dict(variant.settings),
            "control_settings": control_fields(variant),
            "control": control_note(variant),
        }
    return described


__all__ = ["run_sweep", "describe_sweep", "unfinished_runs"]
