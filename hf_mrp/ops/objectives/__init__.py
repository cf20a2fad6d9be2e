"""The objectives: one registry of records (registry.py) holding the built-ins (builtin.py) and the user's own.

Public: `TopK`, `register_objective` (also ``from hf_mrp import ...``); the rest of hf_mrp reads records through
`objective` and `objective_names`, and calls penalties through `evaluate` / `penalty_column`.
"""

from .builtin import FISHER_LIVE_COPIES, fisher_penalty, margin_penalty, proxy_penalty
from .registry import (
    ClosedForm,
    Objective,
    TopK,
    evaluate,
    load_objectives_module,
    objective,
    objective_names,
    objectives_help,
    objectives_table,
    penalty_column,
    register_objective,
)

__all__ = [
    "ClosedForm",
    "FISHER_LIVE_COPIES",
    "Objective",
    "TopK",
    "evaluate",
    "fisher_penalty",
    "load_objectives_module",
    "margin_penalty",
    "objective",
    "objective_names",
    "objectives_help",
    "objectives_table",
    "penalty_column",
    "proxy_penalty",
    "register_objective",
]
