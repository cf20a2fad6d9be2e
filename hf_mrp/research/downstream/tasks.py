"""lm-eval tasks: names, the checks that run before anything heavy loads (lm-eval installed, task names known,
their data reachable offline), and the task set both evaluations share."""

from __future__ import annotations

import difflib
import importlib.util
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...compat import lm_eval_yaml_loader
from ...errors import MRPUserError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

DEFAULT_TASKS = ("arc_challenge", "hellaswag", "winogrande", "piqa", "lambada_openai", "truthfulqa_mc1")
EVAL_INSTALL_HINT = 'pip install "hf_mrp[eval]"'
OFFLINE_HINT = "this machine cannot reach the Hub; use --include_path with local data files"


def parse_task_names(values: Iterable[str]) -> list[str]:
    """Task names from space- and comma-separated values, deduplicated in order (lm-eval's CLI takes commas)."""
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            if name.strip() and name.strip() not in names:
                names.append(name.strip())
    return names


def require_lm_eval() -> str:
    """lm-eval's version, or the one-line fix when it is missing (it is an optional extra)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise MRPUserError(f"hf-mrp downstream needs lm-evaluation-harness; install it with `{EVAL_INSTALL_HINT}`")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"


def task_manager(include_path: str | None, include_defaults: bool = True) -> TaskManager:
    """lm-eval's task index (built-in tasks plus ``include_path``); indexing the ~14k built-in YAMLs takes ~5 s (a
    minute on busy cores), so tasks that all live in ``include_path`` are indexed without them."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise MRPUserError(f"include_path folder not found: {include_path}; pass a folder of lm-eval task YAMLs")
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


LOCAL_TASK_LINE = re.compile(r"""^\s*["']?task["']?\s*:\s*["']?([^"'\s,#]+)""", re.MULTILINE)


def local_task_names(include_path: str | None) -> set[str]:
    """The task names the YAMLs under ``include_path`` define (their ``task:`` line, JSON-style keys too)."""
    if include_path is None or not Path(include_path).is_dir():
        return set()
    names: set[str] = set()
    for path in Path(include_path).rglob("*.yaml"):
        names.update(LOCAL_TASK_LINE.findall(path.read_text(encoding="utf-8", errors="replace")))
    return names


def check_task_names(manager: TaskManager, names: Sequence[str]) -> None:
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


def task_spec(manager: TaskManager, name: str) -> str | dict[str, Any]:
    """``name``, or its full config with relative data_files made absolute against the YAML's folder.

    lm-eval hands data_files to datasets as written, so relative paths would be read from the
    current directory; reading them next to the YAML lets a task folder work from anywhere. A path
    is rewritten only when that file exists, so YAMLs written for the current directory still work.
    """
    entry = manager.task_index.get(name)
    yaml_path = getattr(entry, "yaml_path", None)
    if yaml_path is None or "/lm_eval/tasks/" in Path(yaml_path).as_posix():
        return name
    load_yaml = lm_eval_yaml_loader()
    if load_yaml is None:  # lm-eval < 0.4.10: no rewrite
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


def _builtin_task_yaml(name: str) -> Path | None:
    """The YAML of a built-in lm-eval task, found by its ``task:`` line (a text search: seconds faster than
    TaskManager's YAML index)."""

    spec = importlib.util.find_spec("lm_eval")  # its folder, without importing it (seconds)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tasks"
    pattern = re.compile(rf"^task:\s*['\"]?{re.escape(name)}['\"]?\s*$", re.MULTILINE)
    import itertools

    named = sorted(root.rglob(f"{name}.yaml"))  # most tasks live in a YAML of their own name: read those first
    for path in itertools.chain(named, (p for p in root.rglob("*.yaml") if p not in named)):
        try:
            if pattern.search(path.read_text(encoding="utf-8", errors="replace")):
                return path
        except OSError:
            continue
    return None


def _dataset_path(yaml_path: Path, depth: int = 3) -> str | None:
    """``dataset_path`` of a task YAML, following its ``include:`` files."""

    text = yaml_path.read_text(encoding="utf-8", errors="replace")
    found = re.search(r"^dataset_path:\s*['\"]?([^'\"\s#]+)", text, re.MULTILINE)
    if found:
        return found.group(1)
    included = re.search(r"^include:\s*['\"]?([^'\"\s#]+)", text, re.MULTILINE)
    if included and depth > 0 and (yaml_path.parent / included.group(1)).is_file():
        return _dataset_path(yaml_path.parent / included.group(1), depth - 1)
    return None


def _hub_dataset_is_cached(dataset: str) -> bool:
    """Whether a Hub dataset has anything in the datasets cache or the Hub cache (then it may load offline)."""
    import os

    from huggingface_hub import constants

    datasets_cache = os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets"  # without datasets
    return (Path(datasets_cache) / dataset.replace("/", "___")).exists() or (
        Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}"
    ).exists()


def check_task_data_reachable(names: Sequence[str], hub_problem: str) -> None:
    """Without a reachable Hub, a built-in task whose Hub dataset is in no local cache fails at once (before the
    task index is built and the model loads) instead of after the index and a minute of retries."""
    for name in names:
        yaml_path = _builtin_task_yaml(name)
        dataset = _dataset_path(yaml_path) if yaml_path is not None else None
        if dataset is not None and not Path(dataset).exists() and not _hub_dataset_is_cached(dataset):
            raise MRPUserError(
                f"task {name!r} needs its dataset {dataset!r} from the Hub ({hub_problem}), and it is "
                f"not in the local cache, but {OFFLINE_HINT} (or run where the Hub is reachable)"
            )


def prepare_tasks(names: Sequence[str], include_path: str | None = None) -> TaskSet:
    """Index, check and build ``names``; a wrong name or unreachable data fails here, in seconds."""
    from ...hub_access import hub_problem

    names = parse_task_names(names)
    local = local_task_names(include_path)
    problem = hub_problem()
    if problem is not None:  # local tasks are not searched for among the built-in ones
        check_task_data_reachable([name for name in names if name not in local], problem)
    manager = task_manager(include_path, include_defaults=not set(names) <= local)
    check_task_names(manager, names)
    return TaskSet(names, manager, load_tasks(manager, names))


def load_tasks(manager: TaskManager, names: Sequence[str]) -> list:
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
        return MRPUserError(
            f"task {name!r} needs its dataset from the Hub ({first_line}), but {OFFLINE_HINT} "
            "(or run where the Hub is reachable, or with the dataset already in the datasets cache)"
        )
    if isinstance(error, FileNotFoundError):
        return MRPUserError(
            f"task {name!r}: data not found ({first_line}); check dataset_path and "
            "dataset_kwargs.data_files in its YAML"
        )
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
