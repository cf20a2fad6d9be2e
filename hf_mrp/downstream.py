"""`hf-mrp benchmark`: downstream invariance through lm-evaluation-harness (docs/spec.md).

MRP reshapes decision margins; this checks that it did not cost downstream ability. The same
zero-shot log-likelihood tasks run on the base model and on base + a PEFT adapter, in one process
and on one copy of the weights, and the report gives per-task scores, per-task deltas (adapter
minus base) and the mean delta, as ``downstream.json`` and ``downstream.md``.

lm-evaluation-harness is an optional dependency (``pip install "hf_mrp[eval]"``); it is imported
only inside the functions that need it, so ``import hf_mrp.downstream`` always works.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

from .arguments import ModelArguments
from .errors import MRPUserError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

DEFAULT_TASKS = ("arc_challenge", "hellaswag", "winogrande", "piqa", "lambada_openai", "truthfulqa_mc1")
METRIC_PREFERENCE = ("acc_norm", "acc", "mc2", "mc1")
METRIC_RULE = "acc_norm, else acc, else mc2, else mc1"
EVAL_INSTALL_HINT = 'pip install "hf_mrp[eval]"'
OFFLINE_HINT = "this machine cannot reach the Hub; use --include_path with local data files"
DEFAULT_FILTER = "none"
# Closed-form standard errors for mean metrics need only bootstrap_iters > 0; the bootstrapped ones
# (perplexity) are secondary here, so one chunk of 1,000 draws keeps them cheap.
BOOTSTRAP_ITERS = 1000


@dataclass
class BenchmarkArguments:
    """What to evaluate. --model / --gguf_file (ModelArguments) choose the base model, as in `hf-mrp audit`."""

    adapter: str = field(
        metadata={"help": "Folder of a PEFT adapter for the base model (adapter_config.json inside), "
                          "e.g. the output_dir of examples/refine.py."}
    )
    tasks: list[str] = field(
        default_factory=lambda: list(DEFAULT_TASKS),
        metadata={"help": "lm-eval task names (space- or comma-separated); default: the paper's six "
                          "zero-shot tasks."},
    )
    include_path: str | None = field(
        default=None,
        metadata={"help": "Folder of extra lm-eval task YAMLs; relative data_files in them are read from "
                          "the YAML's folder."},
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
        if self.limit is not None and self.limit < 1:
            raise MRPUserError(f"limit must be a positive number of examples per task, got {self.limit}")
        if self.batch_size < 1:
            raise MRPUserError(f"batch_size must be positive, got {self.batch_size}")


# ---------------------------------------------------------------- pure helpers (no lm-eval import)

def parse_task_names(values: Iterable[str]) -> list[str]:
    """Task names from space- and comma-separated values, deduplicated in order (lm-eval's CLI takes commas)."""
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            if name.strip() and name.strip() not in names:
                names.append(name.strip())
    return names


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


def build_report(base: Mapping[str, Any], adapter: Mapping[str, Any], provenance: Mapping[str, Any]) -> dict:
    """The downstream.json content from two simple_evaluate outputs (same tasks, same order)."""
    tasks = {}
    for name, row in base["results"].items():
        tasks[name] = task_row(row, adapter["results"].get(name, {}))
        tasks[name]["n_samples"] = base.get("n-samples", {}).get(name, {}).get("effective")
        tasks[name]["higher_is_better"] = base.get("higher_is_better", {}).get(name, {})
    return {"provenance": dict(provenance), "metric_rule": METRIC_RULE, "tasks": tasks, "mean": mean_row(tasks)}


def report_markdown(report: Mapping[str, Any]) -> str:
    """downstream.md: one row per task and the mean, deltas signed, in points of the metric."""
    from .reporting.markdown import escape_cell, fmt_number, table

    fmt_delta = lambda value: "n/a" if value is None else f"{value:+.4f}"  # noqa: E731
    rows = [
        [escape_cell(name), escape_cell(row["metric"] or "n/a"), fmt_number(row["base"], 4),
         fmt_number(row["adapter"], 4), fmt_delta(row["delta"]), fmt_number(row["base_stderr"], 4),
         str(row["n_samples"] or "n/a")]
        for name, row in report["tasks"].items()
    ]
    mean = report["mean"]
    rows.append([f"**mean ({_tasks(mean['n_tasks'])})**", "", fmt_number(mean["base"], 4),
                 fmt_number(mean["adapter"], 4), fmt_delta(mean["delta"]), "", ""])
    origin = report["provenance"]
    return "\n".join([
        "# Downstream invariance: base vs base + adapter",
        "",
        f"- base model: {escape_cell(str(origin.get('model')))}",
        f"- adapter: {escape_cell(str(origin.get('adapter')))}",
        f"- lm-evaluation-harness {origin.get('versions', {}).get('lm_eval')}, zero-shot, "
        f"limit {origin.get('arguments', {}).get('limit') or 'none'}",
        f"- metric per task: {METRIC_RULE}; delta = adapter - base",
        "",
        table(["task", "metric", "base", "adapter", "delta", "base stderr", "examples"], rows),
        "",
    ])


def _tasks(count: int) -> str:
    return f"{count} task" if count == 1 else f"{count} tasks"


def summary_line(report: Mapping[str, Any]) -> str:
    """The one line `hf-mrp benchmark` prints: mean delta first, then each task's delta."""
    mean = report["mean"]
    if mean["n_tasks"] == 0:
        return "no task reported acc_norm, acc, mc2 or mc1; see downstream.json for the metrics lm-eval gave"
    parts = [f"{name} {row['delta']:+.4f}" for name, row in report["tasks"].items() if row["delta"] is not None]
    return (f"mean delta {mean['delta']:+.4f} over {_tasks(mean['n_tasks'])} "
            f"(base {mean['base']:.4f} -> adapter {mean['adapter']:.4f}): " + ", ".join(parts))


# ---------------------------------------------------------------- checks before anything heavy loads

def require_lm_eval() -> str:
    """lm-eval's version, or the one-line fix when it is missing (it is an optional extra)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise MRPUserError(f"hf-mrp benchmark needs lm-evaluation-harness; install it with `{EVAL_INSTALL_HINT}`")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"


def resolve_adapter(path: str | Path) -> Path:
    """The adapter folder, checked before the model loads so a typo costs nothing."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise MRPUserError(f"adapter folder not found: {path}; pass the folder a refine run wrote "
                           "(e.g. --adapter outputs/refine, which holds adapter_config.json)")
    if not (folder / "adapter_config.json").is_file():
        raise MRPUserError(f"{path} has no adapter_config.json, so it is not a PEFT adapter folder; pass the "
                           "output_dir of examples/refine.py or a folder written by PeftModel.save_pretrained")
    return folder


def task_manager(include_path: str | None) -> "TaskManager":
    """lm-eval's task index (built-in tasks plus ``include_path``); indexing takes ~5 s."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise MRPUserError(f"include_path folder not found: {include_path}; pass a folder of lm-eval task YAMLs")
    return TaskManager(include_path=include_path)


def check_task_names(manager: "TaskManager", names: Sequence[str]) -> None:
    """Fail on unknown names before the model loads, suggesting the nearest known ones."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise MRPUserError(
                f"unknown task {name!r}{hint}; pass names lm-eval knows (`lm-eval ls tasks` lists them) "
                "or add a task YAML for it to the --include_path folder"
            )


# ---------------------------------------------------------------- tasks and data

def task_spec(manager: "TaskManager", name: str) -> str | dict[str, Any]:
    """``name``, or its full config with relative data_files made absolute against the YAML's folder.

    lm-eval hands data_files to datasets as written, so relative paths would be read from the
    current directory; reading them next to the YAML lets a task folder work from anywhere. A path
    is rewritten only when that file exists, so YAMLs written for the current directory still work.
    """
    entry = manager.task_index.get(name)
    yaml_path = getattr(entry, "yaml_path", None)
    if yaml_path is None or "/lm_eval/tasks/" in Path(yaml_path).as_posix():
        return name
    try:
        from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval >= 0.4.10; older versions: no rewrite
    except ImportError:
        return name
    config = load_yaml(yaml_path, resolve_func=True)
    data_files = (config.get("dataset_kwargs") or {}).get("data_files")
    if data_files is None or not isinstance(config.get("task"), str):
        return name
    absolute = _absolute_data_files(data_files, Path(yaml_path).parent)
    if absolute == data_files:
        return name
    for key in ("tag", "group", "task_list"):
        config.pop(key, None)
    config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": absolute}
    return config


def _absolute_data_files(data_files: Any, folder: Path) -> Any:
    """``data_files`` (a path, a list, or split -> paths) with relative paths that exist under ``folder`` absolute."""
    if isinstance(data_files, Mapping):
        return {split: _absolute_data_files(files, folder) for split, files in data_files.items()}
    if isinstance(data_files, (list, tuple)):
        return [_absolute_data_files(files, folder) for files in data_files]
    if isinstance(data_files, str) and not Path(data_files).is_absolute() and (folder / data_files).exists():
        return str((folder / data_files).resolve())
    return data_files


@dataclass
class TaskSet:
    """Tasks built and their data loaded once, before the model loads, and shared by both runs."""

    names: list[str]
    manager: Any
    tasks: list


def prepare_tasks(names: Sequence[str], include_path: str | None = None) -> TaskSet:
    """Index, check and build ``names``; a wrong name or unreachable data fails here, in seconds."""
    names = parse_task_names(names)
    manager = task_manager(include_path)
    check_task_names(manager, names)
    return TaskSet(names, manager, load_tasks(manager, names))


def load_tasks(manager: "TaskManager", names: Sequence[str]) -> list:
    """Build every task and load its data, naming the task whose data fails."""
    tasks = []
    for name in names:
        try:
            loaded = manager.load([task_spec(manager, name)])
        except Exception as error:  # noqa: BLE001 - datasets raises many types; known ones become one line
            user_error = _data_error(name, error)
            if user_error is None:
                raise
            raise user_error from error
        tasks.extend(loaded["tasks"].values())
    return tasks


def _data_error(name: str, error: BaseException) -> MRPUserError | None:
    """A one-line fix for data that cannot be loaded, or None for errors that are not the user's to fix."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if _is_network_error(error):
        return MRPUserError(f"task {name!r} needs its dataset from the Hub ({first_line}), but {OFFLINE_HINT} "
                            "(or run where the Hub is reachable, or with the dataset already in the datasets cache)")
    if isinstance(error, FileNotFoundError):
        return MRPUserError(f"task {name!r}: data not found ({first_line}); check dataset_path and "
                            "dataset_kwargs.data_files in its YAML")
    return None


def _is_network_error(error: BaseException | None) -> bool:
    """True when the error, or one it was raised from, is a failed or forbidden (offline) Hub request."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        names = " ".join(cls.__name__ for cls in type(error).__mro__)
        if isinstance(error, (ConnectionError, TimeoutError)) or any(
            word in names for word in ("Offline", "ConnectError", "ConnectionError", "Timeout")
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


# ---------------------------------------------------------------- evaluation

def evaluate(model, tokenizer, task_set: TaskSet, limit: int | None, batch_size: int) -> dict:
    """simple_evaluate on an already-loaded model (a PreTrainedModel or a PeftModel), zero-shot."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with _quiet_stdout(), _single_process_bootstrap():
        return simple_evaluate(
            model=lm, tasks=task_set.tasks, num_fewshot=0, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False, task_manager=task_set.manager,
        )


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
        detail = next((line for line in lines if "size mismatch" in line), lines[0])
        named = _adapter_base(adapter)
        named = f" (its adapter_config.json names {named!r})" if named else ""
        raise MRPUserError(
            f"could not apply adapter {adapter} to the base model ({detail[:300]}); pass the base model the adapter "
            f"was trained on with --model / --gguf_file{named}"
        ) from error


def _adapter_base(adapter: Path) -> str | None:
    from .reporting.files import read_json

    try:
        return read_json(adapter / "adapter_config.json").get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def benchmark(
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
        with tuned_model.disable_adapter():  # LoRA layers skipped: exactly the base model's forward
            base = evaluate(tuned_model, tokenizer, task_set, limit, batch_size)
        tuned = evaluate(tuned_model, tokenizer, task_set, limit, batch_size)
    finally:
        tuned_model.unload()
    origin = dict(provenance or {})
    origin.setdefault("model", getattr(model, "name_or_path", None))
    origin.update(adapter=str(adapter), adapter_base_model=_adapter_base(adapter), tasks=task_set.names,
                  seconds=round(time.perf_counter() - start, 2))
    origin["versions"] = {**origin.get("versions", {}), "lm_eval": lm_eval_version}
    return build_report(base, tuned, origin)


def write_report(report: Mapping[str, Any], output_dir: str | Path) -> None:
    from .reporting.files import write_json, write_text

    write_json(Path(output_dir) / "downstream.json", report)
    write_text(Path(output_dir) / "downstream.md", report_markdown(report))


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def benchmark_from_arguments(model_args: ModelArguments, bench_args: BenchmarkArguments) -> dict:
    """Check everything cheap first (lm-eval, adapter, tasks and their data), then load the model and run."""
    from .arguments import provenance
    from .models import load_model_from_arguments
    from .reporting.files import ensure_output_dir

    require_lm_eval()
    resolve_adapter(bench_args.adapter)
    ensure_output_dir(bench_args.output_dir)
    task_set = prepare_tasks(bench_args.tasks, bench_args.include_path)
    model, tokenizer, name = load_model_from_arguments(model_args)
    if not model_args.load_in_4bit:  # bitsandbytes places 4-bit weights itself
        model.to(_device(bench_args.device))
    report = benchmark(
        model, tokenizer, bench_args.adapter, task_set, limit=bench_args.limit, batch_size=bench_args.batch_size,
        provenance=provenance(name, model_args, bench_args),
    )
    write_report(report, bench_args.output_dir)
    return report


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, BenchmarkArguments]:
    from .parser import MRPArgumentParser

    parser = MRPArgumentParser((ModelArguments, BenchmarkArguments), prog="hf-mrp benchmark")
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> None:
    """`hf-mrp benchmark`: parse, run, write, print one summary line."""
    model_args, bench_args = parse_arguments(argv)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-request INFO/WARNING lines drown the summary
    report = benchmark_from_arguments(model_args, bench_args)
    print(f"{summary_line(report)} -> {Path(bench_args.output_dir) / 'downstream.json'}")
