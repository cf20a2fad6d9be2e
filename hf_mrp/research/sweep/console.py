"""The sweep's console while Ray Tune runs it: one line as each run starts, finishes or fails, a short table of the
running runs (step / max_steps, loss, time) every half minute, and the trial table at the end."""

from __future__ import annotations

import time

from ray.tune import Callback

from .plan import RunSpec, format_lambda
from .trial import FAILED, FINISHED

EVERY = 30.0  # seconds between two tables of the running runs


class TrialTable(Callback):
    """Tune's callbacks, printed as the sweep's console (Tune's own reporter is off: verbose=0)."""

    def __init__(self, todo: list[RunSpec], total: int):
        self.specs = {spec.name: spec for spec in todo}
        self.total, self.done = total, total - len(todo)  # runs of the sweep, runs finished before this call
        self.status = {spec.name: "PENDING" for spec in todo}
        self.progress: dict[str, str] = {}
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.last_table = time.monotonic()

    def _count(self) -> str:
        self.done += 1
        return f"[{self.done}/{self.total}]"

    def on_trial_start(self, iteration, trials, trial, **info):
        spec = self.specs[trial.config["run"]]
        self.status[spec.name], self.started[spec.name] = "RUNNING", time.monotonic()
        print(
            f"training {spec.name} (objective {spec.train_objective}, lambda {format_lambda(spec.lam)}, "
            f"seed {spec.seed})",
            flush=True,
        )

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("step") is not None:
            loss = result.get("loss")
            shown = f"step {result['step']}/{result.get('max_steps')}"
            if result.get("auditing"):
                shown = f"auditing after {shown}"
            elif isinstance(loss, float):
                shown += f"  loss {loss:.4g}"
            self.progress[trial.config["run"]] = shown

    def on_trial_complete(self, iteration, trials, trial, **info):
        name, result = trial.config["run"], trial.last_result or {}
        self.seconds[name] = time.monotonic() - self.started.get(name, time.monotonic())
        if result.get("status") == FAILED:
            self.status[name] = FAILED
            print(f"{self._count()} FAILED {name}: {result.get('reason')}", flush=True)
        else:
            self.status[name] = FINISHED
            print(f"{self._count()} finished {name} in {result.get('seconds', self.seconds[name]):.1f}s", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        name = trial.config["run"]
        self.status[name], self.seconds[name] = FAILED, time.monotonic() - self.started.get(name, time.monotonic())
        print(f"{self._count()} FAILED {name}: it raised (its error: {trial.error_file})", flush=True)

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last_table < EVERY:
            return
        self.last_table = time.monotonic()
        running = [name for name, status in self.status.items() if status == "RUNNING"]
        if running:
            print("\n".join(self.lines(running)), flush=True)

    def lines(self, names: list[str]) -> list[str]:
        """The trial table: each run's status, its progress or time, and a count by status."""
        width = max(len(name) for name in names)
        rows = []
        for name in names:
            status = self.status[name]
            detail = self.progress.get(name, "") if status == "RUNNING" else ""
            seconds = self.seconds.get(name, time.monotonic() - self.started.get(name, time.monotonic()))
            timing = f"{seconds:7.1f}s" if name in self.started else ""
            rows.append(f"  {name:<{width}}  {status:<8}  {timing:>8}  {detail}".rstrip())
        count = list(self.status.values()).count
        head = (
            f"runs: {count('RUNNING')} running, {count(FINISHED)} finished, {count(FAILED)} failed, "
            f"{count('PENDING')} pending"
        )
        return [head, *rows]

    def print_summary(self) -> None:
        if self.status:
            print("\n".join(self.lines(list(self.status))), flush=True)


__all__ = ["TrialTable", "EVERY"]
