"""Audits: the float32 geometry of a model on fixed positions, and (compare) two audits side by side."""

from .compare import compare_audits, compare_dirs
from .geometry import AuditResult, collect_statistics, load_audit, run_audit, summarize_positions, write_audit

__all__ = [
    "AuditResult", "collect_statistics", "compare_audits", "compare_dirs", "load_audit", "run_audit",
    "summarize_positions", "write_audit",
]
