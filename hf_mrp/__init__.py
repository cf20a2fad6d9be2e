"""hf_mrp: measure and reshape the Voronoi geometry of a causal LM's next-token decisions.

Public API (imported lazily so `import hf_mrp` stays cheap):
run_audit, load_audit, compare_audits, compare_dirs, MRPConfig, MRPTrainer, register_objective, TopK, and with the
``hf_mrp[trl]`` extra MRPSFTConfig, MRPSFTTrainer.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "run_audit": "hf_mrp.audit.geometry",
    "load_audit": "hf_mrp.audit.geometry",
    "AuditResult": "hf_mrp.audit.geometry",
    "MRPUserError": "hf_mrp.errors",
    "load_blocks": "hf_mrp.data",
    "load_model_and_tokenizer": "hf_mrp.models",
    "compare_audits": "hf_mrp.audit.compare",
    "compare_dirs": "hf_mrp.audit.compare",
    "MRPConfig": "hf_mrp.training.config",
    "MRPTrainer": "hf_mrp.training.trainer",
    "MRPSFTConfig": "hf_mrp.training.sft",
    "MRPSFTTrainer": "hf_mrp.training.sft",
    "register_objective": "hf_mrp.ops.objectives",
    "TopK": "hf_mrp.ops.objectives",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hf_mrp' has no attribute {name!r}")
