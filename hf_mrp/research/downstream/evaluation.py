"""Evaluate a base model and base + adapter on the same tasks, in one process on one copy of the weights."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...compat import size_mismatch_line
from ...errors import MRPUserError
from ...hub_access import offline_when_unreachable
from ...storage.files import check_output_dir, read_json
from ..arguments import ModelArguments, provenance
from .adapter_folder import resolve_adapter
from .offline_suite import SUITES, TASKS, build_suite, check_suite
from .report import build_report, write_report
from .tasks import DEFAULT_TASKS, TaskSet, parse_task_names, prepare_tasks, require_lm_eval

# Closed-form standard errors for mean metrics need only bootstrap_iters > 0; the bootstrapped ones
# (perplexity) are secondary here, so one chunk of 1,000 draws keeps them cheap.
BOOTSTRAP_ITERS = 1000


@dataclass
class DownstreamArguments:
    """What to evaluate. --model / --gguf_file (ModelArguments) choose the base model, as in `hf-mrp audit`."""

    adapter: str = field(
        metadata={
            "help": "Folder of a PEFT adapter for the base model (adapter_config.json inside), "
            "e.g. the output_dir of examples/refine.py."
        }
    )
    tasks: list[str] = field(
        default_factory=lambda: list(DEFAULT_TASKS),
        metadata={"help": "lm-eval task names (space- or comma-separated); default: the paper's six zero-shot tasks."},
    )
    include_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder of extra lm-eval task YAMLs; relative data_files in them are read from the YAML's folder."
        },
    )
    suite: str | None = field(
        default=None,
        metadata={
            "help": "'offline': instead of --tasks, four tasks built from data installed packages ship (MMLU "
            "questions, Google analogies, a LAMBADA-style last word, HumanEval perplexity; docs/downstream.md), "
            "written into --output_dir/offline_tasks. An offline proxy, not the paper's six tasks.",
            "choices": list(SUITES),
        },
    )
    limit: int | None = field(default=None, metadata={"help": "Examples per task (quick runs); default: all."})
    batch_size: int = field(default=8, metadata={"help": "Requests per forward pass."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, ...; default: cuda when available."})
    output_dir: str = field(
        default="outputs/downstream", metadata={"help": "Folder for downstream.json and downstream.md."}
    )

    def __post_init__(self) -> None:
        self.tasks = parse_task_names(self.tasks)
        if not self.tasks:
            raise MRPUserError("no tasks given; pass --tasks NAME [NAME ...] or omit --tasks for the six default tasks")
        if self.suite is not None and (self.tasks != list(DEFAULT_TASKS) or self.include_path is not None):
            raise MRPUserError(f"--suite {self.suite} chooses the tasks itself; pass --suite or --tasks/--include_path")
        if self.suite is not None and self.suite not in SUITES:
            raise MRPUserError(f"unknown suite {self.suite!r}; the one suite is {', '.join(SUITES)}")
        if self.limit is not None and self.limit < 1:
            raise MRPUserError(f"limit must be a positive number of examples per task, got {self.limit}")
        if self.batch_size < 1:
            raise MRPUserError(f"batch_size must be positive, got {self.batch_size}")


def evaluate(model, tokenizer, task_set: TaskSet, limit: int | None, batch_size: int) -> dict:
    """simple_evaluate on an already-loaded model (a PreTrainedModel or a PeftModel), zero-shot, with the per-item
    samples logged (the paired invariance test needs them; invariance.py reads them and the report drops them)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with _quiet_stdout(), _single_process_bootstrap():
        return simple_evaluate(
            model=lm,
            tasks=task_set.tasks,
            num_fewshot=0,
            limit=limit,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=True,
            task_manager=task_set.manager,
        )


def evaluate_both(tuned_model, tokenizer, task_set: TaskSet, limit: int | None, batch_size: int) -> tuple[dict, dict]:
    """(base, adapter) simple_evaluate outputs of a PeftModel: the base run inside disable_adapter() (LoRA layers
    skipped: exactly the base model's forward), then the adapter run; lm-eval's progress bars on stderr."""
    was_training = tuned_model.training
    tuned_model.eval()
    try:
        print("downstream 1/2: the base model (adapter disabled)", file=sys.stderr, flush=True)
        with tuned_model.disable_adapter():
            base = evaluate(tuned_model, tokenizer, task_set, limit, batch_size)
        print("downstream 2/2: base + adapter", file=sys.stderr, flush=True)
        tuned = evaluate(tuned_model, tokenizer, task_set, limit, batch_size)
    finally:
        tuned_model.train(was_training)
    return base, tuned


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """lm-eval print()s progress ("bootstrapping for stddev: ..."); to stderr, so stdout holds only the summary."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def _single_process_bootstrap() -> Iterator[None]:
    """lm-eval bootstraps perplexity stderrs in a pool of cpu_count() forked processes; for one chunk of
    draws, forking a process that holds the model (and maybe a CUDA context) costs more than it saves."""
    previous = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["DISABLE_MULTIPROC"]
        else:
            os.environ["DISABLE_MULTIPROC"] = previous


def apply_adapter(model, adapter: Path):
    """Wrap ``model`` with the adapter; a mismatched base fails with the fix, not a shape traceback."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter)).eval()
    except (RuntimeError, ValueError, KeyError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
        detail = size_mismatch_line(lines) or lines[0]
        named = _adapter_base(adapter)
        named = f" (its adapter_config.json names {named!r})" if named else ""
        raise MRPUserError(
            f"could not apply adapter {adapter} to the base model ({detail[:300]}); pass the base model the adapter "
            f"was trained on with --model / --gguf_file{named}"
        ) from error


def _adapter_base(adapter: Path) -> str | None:
    try:
        return read_json(adapter / "adapter_config.json").get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def compare_downstream(
    model,
    tokenizer,
    adapter: str | Path,
    tasks: Sequence[str] | TaskSet = DEFAULT_TASKS,
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    provenance: Mapping[str, Any] | None = None,
) -> dict:
    """Evaluate ``model`` and ``model`` + ``adapter`` on ``tasks``; return the report (see build_report).

    ``tasks`` is a list of names (with ``include_path``) or a TaskSet from prepare_tasks. Both runs
    share one copy of the weights: the adapter is injected first (a mismatch fails before any
    evaluation), disabled for the base run, and unloaded at the end, so ``model`` is handed back
    unchanged.
    """
    lm_eval_version = require_lm_eval()
    adapter = resolve_adapter(adapter)
    task_set = tasks if isinstance(tasks, TaskSet) else prepare_tasks(tasks, include_path)
    tuned_model = apply_adapter(model, adapter)  # before any evaluation, so a mismatched adapter fails at once
    start = time.perf_counter()
    try:
        base, tuned = evaluate_both(tuned_model, tokenizer, task_set, limit, batch_size)
    finally:
        tuned_model.unload()
    origin = dict(provenance or {})
    origin.setdefault("model", getattr(model, "name_or_path", None))
    origin.update(
        adapter=str(adapter),
        adapter_base_model=_adapter_base(adapter),
        tasks=task_set.names,
        seconds=round(time.perf_counter() - start, 2),
    )
    origin["versions"] = {**origin.get("versions", {}), "lm_eval": lm_eval_version}
    return build_report(base, tuned, origin, task_set.names)


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def downstream_from_arguments(model_args: ModelArguments, downstream_args: DownstreamArguments) -> dict:
    """Check everything cheap first (lm-eval, adapter, tasks and their data), then load the model and run. Without a
    reachable Hub, tasks whose data is not cached fail in seconds (hub_access), before torch is even imported."""
    from ..loading import load_model_from_arguments

    require_lm_eval()
    resolve_adapter(downstream_args.adapter)
    check_output_dir(downstream_args.output_dir)  # created by the report's first file: a refusal leaves none
    if downstream_args.suite is not None:
        check_suite(downstream_args.suite)  # its packages; it is built once the model loaded (a refusal writes none)
    with offline_when_unreachable():  # an unreachable Hub: cached task data still loads, the rest fails at once
        if downstream_args.suite is None:
            task_set = prepare_tasks(downstream_args.tasks, downstream_args.include_path)
        model, tokenizer, name = load_model_from_arguments(model_args)
    suite = {}
    if downstream_args.suite is not None:  # built into the output folder: the exact items travel with the report
        folder = str(Path(downstream_args.output_dir) / "offline_tasks")
        suite = {"suite": downstream_args.suite, "suite_items": build_suite(folder)}
        task_set = prepare_tasks(list(TASKS), folder)
    if not model_args.load_in_4bit:  # bitsandbytes places 4-bit weights itself
        model.to(_device(downstream_args.device))
    report = compare_downstream(
        model,
        tokenizer,
        downstream_args.adapter,
        task_set,
        limit=downstream_args.limit,
        batch_size=downstream_args.batch_size,
        provenance=provenance(name, model_args, downstream_args) | suite,
    )
    write_report(report, downstream_args.output_dir)
    return report


def suite_downstream(
    tuned_model,
    tokenizer,
    suite: str,
    output_dir: str | Path,
    batch_size: int = 8,
    origin: Mapping | None = None,
    limit: int | None = None,
) -> dict:
    """A suite on a PeftModel in memory (`hf-mrp refine --downstream offline`, after the after-audit): the base run
    with the adapter disabled, then base + adapter, on the same items; the report (downstream.json, downstream.md,
    invariance.png) and the suite's tasks (offline_tasks/) are written into ``output_dir``.

    Args:
        tuned_model: the trained PeftModel (left as it was: training mode restored, adapter enabled).
        tokenizer: its tokenizer.
        suite: a name of SUITES.
        output_dir: the report's folder.
        batch_size: requests per forward pass.
        origin: provenance to record (model, arguments, versions).
        limit: items per task (a quick check); default: all.
    """
    lm_eval_version = require_lm_eval()
    if suite not in SUITES:
        raise MRPUserError(f"unknown downstream suite {suite!r}; the one suite is {', '.join(SUITES)}")
    folder = Path(output_dir)
    items = build_suite(folder / "offline_tasks")
    task_set = prepare_tasks(list(TASKS), str(folder / "offline_tasks"))
    start = time.perf_counter()
    base, tuned = evaluate_both(tuned_model, tokenizer, task_set, limit, batch_size)
    provenance = dict(origin or {}) | {"suite": suite, "suite_items": items, "tasks": task_set.names}
    provenance |= {"seconds": round(time.perf_counter() - start, 2), "batch_size": batch_size, "limit": limit}
    provenance["versions"] = {**provenance.get("versions", {}), "lm_eval": lm_eval_version}
    report = build_report(base, tuned, provenance, task_set.names)
    write_report(report, folder)
    return report
