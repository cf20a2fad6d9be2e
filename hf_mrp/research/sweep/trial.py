"""What runs inside one Ray Tune trial: one run of the sweep (runs.execute_run), into its own folder under runs/.

With one process the run trains in the trial's own process (a Ray actor), reporting its step to Tune as it goes;
with ``processes_per_run`` > 1 the trial launches a Ray Train TorchTrainer whose workers each call the same
refine pipeline (MRPTrainer unchanged: Ray Train sets up the process group and RANK / WORLD_SIZE, as torchrun
does). A run that diverges reports its one-line reason (a FAILED row, never a Ray error); anything else it raises
is a Ray error, which the engine turns into a FAILED row too and which a rerun of the command redoes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import TrainerCallback

from ...training.divergence import TrainingDiverged
from ..refine import refine
from .plan import RunSpec
from .runs import RunArguments, execute_run, free_memory

FAILED, FINISHED = "FAILED", "finished"
WAITING_CPU = 0.01  # what the trial of a run on several processes holds itself (Ray needs a trial to hold something)


class TrialSetup(NamedTuple):
    """What every trial needs from the driver (tune.with_parameters ships it once through Ray's object store)."""

    runs: dict[str, tuple[RunSpec, RunArguments]]  # name -> (spec, its arguments)
    sweep_dir: Path  # absolute
    baseline_dir: Path
    cwd: str  # the driver's working folder: relative paths in the flags (--model ./model) mean the same
    processes: int
    cpus: float  # per run
    gpus: float  # per run


class ProgressReport(TrainerCallback):
    """Each logged step of the run, to Tune (the driver's trial table shows step / max_steps and the loss), and the
    end of the last step (the table then says the run is auditing: the after-audit follows, with no step to show).

    ``report``: tune.report in a trial's own process; in Ray Train workers ray.train.report, which every worker
    calls (a report is a step all of them take) and whose rank 0 metrics Ray passes on to Tune
    (TuneReportCallback)."""

    def __init__(self, report: Callable[[dict], object], every_process: bool = False):
        self.report, self.every_process = report, every_process

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._report(state, (logs or {}).get("loss"))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:  # the last step: the after-audit runs next, minutes at full size
            self._report(state, None)

    def _report(self, state, loss: float | None) -> None:
        if self.every_process or state.is_world_process_zero:
            done = state.global_step >= state.max_steps  # what follows the last step is the after-audit
            progress = {"step": state.global_step, "max_steps": state.max_steps, "auditing": done}
            self.report({"status": "RUNNING", **progress, "loss": loss})


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The trainable of every trial: ``config["run"]`` names the run; its outcome is the last report."""
    from ray import tune

    os.chdir(setup.cwd)
    spec, arguments = setup.runs[config["run"]]
    run_dir = setup.sweep_dir / "runs" / spec.name
    if setup.processes == 1:
        train = partial(train_here, baseline_dir=setup.baseline_dir, cpus=setup.cpus)
    else:
        train = partial(train_on_workers, setup=setup)
    try:
        seconds = execute_run(spec, arguments, run_dir, setup.baseline_dir, train)
    except TrainingDiverged as error:
        tune.report({"status": FAILED, "reason": str(error)})
        return
    tune.report({"status": FINISHED, "seconds": seconds})


def train_here(arguments: RunArguments, baseline_dir: Path, cpus: float) -> None:
    """The run in this process, its progress reported to Tune."""
    from ray import tune

    use_cpus(cpus)
    refine(*fresh(arguments), baseline_dir=baseline_dir, callbacks=[ProgressReport(tune.report)])


def use_cpus(cpus: float) -> None:
    """torch's threads: the CPUs the process holds (at least one), whatever OMP_NUM_THREADS the driver had."""
    torch.set_num_threads(max(1, int(cpus)))


def fresh(arguments: RunArguments) -> RunArguments:
    """The argument groups built again where they are used: TrainingArguments caches its device and process
    layout on first use (the driver's, for the run whose arguments audited the baseline)."""
    model, data, refine_args, config = arguments
    return RunArguments(
        dataclasses.replace(model),
        dataclasses.replace(data),
        dataclasses.replace(refine_args),
        dataclasses.replace(config),
    )


def train_on_workers(arguments: RunArguments, setup: TrialSetup) -> None:
    """The run on ``setup.processes`` Ray Train workers (DDP; gloo without GPUs), each with an equal share of the
    run's CPUs and GPUs; a divergence any worker reports is raised here as the run's TrainingDiverged."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    share = {"CPU": (setup.cpus - WAITING_CPU) / setup.processes, "GPU": setup.gpus / setup.processes}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            "arguments": arguments,
            "baseline_dir": str(setup.baseline_dir),
            "cwd": setup.cwd,
            "cpus": share["CPU"],
        },
        scaling_config=ScalingConfig(num_workers=setup.processes, use_gpu=setup.gpus > 0, resources_per_worker=share),
        torch_config=TorchConfig(backend="nccl" if setup.gpus > 0 else "gloo"),
        run_config=RunConfig(
            name=f"train-{Path(str(arguments.config.output_dir)).name}",
            storage_path=str(setup.sweep_dir / "ray"),
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # Train V2 RunConfig at run time; reports reach Tune
        ),
    )
    result = trainer.fit()
    reason = (result.metrics or {}).get("diverged")
    if reason:
        raise TrainingDiverged(reason)


def worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the refine pipeline, as one process of a torchrun launch would run it."""
    from ray import train

    os.chdir(config["cwd"])
    use_cpus(config["cpus"])
    reason = ""
    try:
        progress = ProgressReport(train.report, every_process=True)
        refine(*fresh(config["arguments"]), baseline_dir=config["baseline_dir"], callbacks=[progress])
    except TrainingDiverged as error:
        reason = str(error)
    free_memory()
    train.report({"diverged": reason})


__all__ = ["FAILED", "FINISHED", "WAITING_CPU", "TrialSetup", "run_trial", "train_here", "train_on_workers", "fresh"]
