"""The sweep's engine: Ray Tune runs the grid, one trial per run (trial.py), as the resources free up.

With nothing set, a local Ray starts in this process on this machine's own CPUs and GPUs (no dashboard, its logs
kept out of the console) and stops at the end; with --ray_address or $RAY_ADDRESS the runs go to that cluster
(`ray start --head` / `ray start --address`, KubeRay, SLURM: docs/sweep.md), whose nodes must see the sweep folder
(a shared file system) and have hf_mrp installed. A Ray already initialized in this process (a notebook, the tests)
is used as it is.

Resuming: the run folders are the record of what is done (runs.execute_run; run_folders.run_is_whole). Each call
hands Tune only the runs not finished yet, so a finished run is never trained again, whatever killed the driver
before (a crash, Ctrl-C, SIGKILL, a lost node), and Tune's own experiment folder (``ray/`` in the sweep folder)
is started afresh each call.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from ...errors import MRPUserError
from .arguments import SweepArguments
from .plan import RunSpec
from .runs import BASELINE, RunArguments
from .trial import FAILED, FINISHED, WAITING_CPU, TrialSetup, run_trial

ENGINE = "ray"
INSTALL = "pip install 'hf_mrp[sweep]'  (or: pip install 'ray[tune,train]==2.60.0')"
# Where the trials' processes get their settings from: the local Ray this process starts inherits them; a cluster's
# workers get them through the job's runtime environment.
QUIET = {
    "RAY_CHDIR_TO_TRIAL_DIR": "0",  # trials keep the driver's working folder (trial.run_trial goes there anyway)
    "RAY_AIR_NEW_OUTPUT": "0",  # with verbose=0: no reporter of Tune's own (console.TrialTable is the console)
    "RAY_DEDUP_LOGS": "0",
}


def require_ray():
    """The ray module, or one line saying how to install it."""
    try:
        import ray
        from ray import tune  # noqa: F401  # the extra's parts: ray[tune,train]
        from ray.train import torch  # noqa: F401
    except ImportError:
        raise MRPUserError(f"the sweep runs on Ray, which is not installed here: {INSTALL}") from None
    return ray


def engine_record(address: str | None) -> dict[str, Any]:
    """results.json's "engine": Ray, its version, where the runs ran (None: nothing trained in this call)."""
    try:
        version = metadata.version("ray")
    except metadata.PackageNotFoundError:
        version = None
    return {"name": ENGINE, "version": version, "address": address}


@contextmanager
def ray_engine(args: SweepArguments) -> Iterator[str]:
    """Ray for the length of the block; yields its address ("local": started here, on this machine)."""
    ray = require_ray()
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        yield ray.get_runtime_context().gcs_address
        return
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or None
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR)  # the runs' logs stay in their folders
    if address:
        ray.init(address=address, runtime_env={"env_vars": dict(QUIET)}, **quiet)
    else:
        ray.init(include_dashboard=False, **quiet)
    try:
        yield address or "local"
    finally:
        ray.shutdown()


def gpus_per_run(args: SweepArguments, use_cpu: bool) -> float:
    """--gpus_per_run, or by default one GPU a run where the cluster has GPUs (none where it has none, or where the
    runs train on the CPU: --use_cpu)."""
    if args.gpus_per_run is not None:
        return float(args.gpus_per_run)
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 and not use_cpu else 0.0


def run_grid(
    args: SweepArguments, todo: list[RunSpec], arguments: dict[str, RunArguments], sweep_dir: Path, total: int
) -> tuple[list[str], dict[str, str]]:
    """Train the runs of ``todo`` as Ray Tune trials; returns (the runs finished, {run: why it failed})."""
    from ray import tune

    from .console import TrialTable  # a ray.tune.Callback: imported with ray

    setup = TrialSetup(
        runs={spec.name: (spec, arguments[spec.name]) for spec in todo},
        sweep_dir=sweep_dir,
        baseline_dir=sweep_dir / BASELINE,
        cwd=os.getcwd(),
        processes=args.processes_per_run,
        cpus=args.cpus_per_run,
        gpus=gpus_per_run(args, bool(arguments[todo[0].name].config.use_cpu)),
    )
    check_fits(setup)
    storage = sweep_dir / "ray"
    shutil.rmtree(storage, ignore_errors=True)  # the run folders, not Tune's record, say what is done
    table = TrialTable(todo, total)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_resources(setup)),
        param_space={"run": tune.grid_search([spec.name for spec in todo])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrency(args, setup),
            reuse_actors=True,  # one process per concurrent run: torch and the model's code are imported once
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(storage),
            verbose=0,
            callbacks=[table],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    with quiet_loggers("ray.tune", "ray.train"):  # a failed run: one line (console.TrialTable), not its traceback
        grid = tuner.fit()
    table.print_summary()
    return outcomes(grid, todo)


def outcomes(grid, todo: list[RunSpec]) -> tuple[list[str], dict[str, str]]:
    """(the runs that finished, {run: why it failed}) from Tune's results. Runs that neither finished nor failed mean
    the sweep was stopped (Ctrl-C reaches Tune first, which ends its trials and returns; a trial that never started
    has no config): one line naming them, then KeyboardInterrupt, so `hf-mrp` ends as on any interrupt (exit 130);
    the next call trains them (finished runs are kept)."""
    executed, failed = [], {}
    for index in range(len(grid)):
        result = grid[index]
        name, status = (result.config or {}).get("run"), (result.metrics or {}).get("status")
        if name is None:
            continue  # never started
        if result.error is not None:
            failed[name] = one_line(result.error)
        elif status == FAILED:
            failed[name] = str((result.metrics or {}).get("reason") or "failed")
        elif status == FINISHED:
            executed.append(name)
    stopped = [spec.name for spec in todo if spec.name not in failed and spec.name not in executed]
    if stopped:
        shown = ", ".join(stopped[:3]) + (f" and {len(stopped) - 3} more" if len(stopped) > 3 else "")
        print(
            f"the sweep was stopped before {len(stopped)} runs finished ({shown}); run the same command again to "
            "finish them (finished runs are kept)",
            flush=True,
        )
        raise KeyboardInterrupt
    return [spec.name for spec in todo if spec.name in executed], failed


@contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _trial_name(trial) -> str:
    return str(trial.config["run"])


def trial_resources(setup: TrialSetup) -> dict[str, float]:
    """What a trial holds: the run's CPUs and GPUs, or with several processes only WAITING_CPU of them (it waits
    for its Train workers, which hold the rest: trial.train_on_workers)."""
    if setup.processes > 1:
        return {"cpu": WAITING_CPU, "gpu": 0}
    return {"cpu": setup.cpus, "gpu": setup.gpus}


def concurrency(args: SweepArguments, setup: TrialSetup) -> int | None:
    """--max_concurrent_runs (None: as the resources allow), and with several processes a run no more runs than the
    cluster holds whole: Tune sees only the trials' own WAITING_CPU, and runs that each hold part of what their
    workers need would wait on each other for ever."""
    import ray

    limits = [args.max_concurrent_runs] if args.max_concurrent_runs else []
    if setup.processes > 1:
        have = ray.cluster_resources()
        limits.append(int(have.get("CPU", 0) // setup.cpus))
        if setup.gpus > 0:
            limits.append(int(have.get("GPU", 0) // setup.gpus))
    return max(1, min(limits)) if limits else None


def check_fits(setup: TrialSetup) -> None:
    """A run larger than the whole cluster would wait for ever: refuse it in one line."""
    import ray

    have = ray.cluster_resources()
    for name, want in (("CPU", setup.cpus), ("GPU", setup.gpus)):
        if want > have.get(name, 0):
            flag = f"--{name.lower()}s_per_run"
            raise MRPUserError(
                f"a run asks for {want:g} {name}s ({flag}) but the Ray cluster has {have.get(name, 0):g}; "
                f"lower {flag}, or run on a larger cluster (--ray_address)"
            )


def one_line(error: BaseException) -> str:
    """The last line of a trial's error (Ray's text ends with the original exception: 'ValueError: ...')."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


__all__ = ["ENGINE", "require_ray", "engine_record", "ray_engine", "run_grid", "trial_resources", "one_line"]
