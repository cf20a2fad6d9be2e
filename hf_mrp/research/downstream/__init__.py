"""`hf-mrp downstream`: downstream invariance through lm-evaluation-harness (docs/spec.md).

MRP reshapes decision margins; this checks that it did not cost downstream ability. The same
zero-shot log-likelihood tasks run on the base model and on base + a PEFT adapter, in one process
and on one copy of the weights, and the report gives per-task scores, per-task deltas (adapter
minus base) and the mean delta, as ``downstream.json`` and ``downstream.md``.

lm-evaluation-harness is an optional dependency (``pip install "hf_mrp[eval]"``); it is imported
only inside the functions that need it, so ``import hf_mrp.research.downstream`` always works.
"""

from .evaluation import (
    BOOTSTRAP_ITERS,
    DownstreamArguments,
    apply_adapter,
    compare_downstream,
    downstream_from_arguments,
    evaluate_both,
    suite_downstream,
)
from .invariance import decide_invariance, invariance_markdown, item_values, plot_invariance, verdict
from .offline_suite import SUITES, build_suite, check_suite
from .report import (
    METRIC_PREFERENCE,
    METRIC_RULE,
    build_report,
    mean_row,
    metric_values,
    report_markdown,
    select_metric,
    stderr_values,
    summary_line,
    task_row,
    write_report,
)
from .tasks import DEFAULT_TASKS, TaskSet, load_tasks, parse_task_names, prepare_tasks, require_lm_eval, task_manager

__all__ = [
    "BOOTSTRAP_ITERS",
    "DEFAULT_TASKS",
    "METRIC_PREFERENCE",
    "METRIC_RULE",
    "DownstreamArguments",
    "SUITES",
    "TaskSet",
    "apply_adapter",
    "build_report",
    "build_suite",
    "check_suite",
    "evaluate_both",
    "decide_invariance",
    "invariance_markdown",
    "item_values",
    "plot_invariance",
    "suite_downstream",
    "verdict",
    "compare_downstream",
    "downstream_from_arguments",
    "load_tasks",
    "mean_row",
    "metric_values",
    "parse_task_names",
    "prepare_tasks",
    "report_markdown",
    "require_lm_eval",
    "select_metric",
    "stderr_values",
    "summary_line",
    "task_manager",
    "task_row",
    "write_report",
]
