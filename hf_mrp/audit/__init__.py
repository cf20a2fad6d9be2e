"""Audits: the float32 geometry of a model on fixed positions, and (compare) two audits side by side."""

from .collect import collect_statistics
from .compare import compare_audits, compare_dirs
from .geometry import AuditResult, load_audit, run_audit, summarize_positions, write_audit
from .lens_training import LensTrainingSettings, train_tuned_lens
from .manifold import ManifoldOptions
from .tuned_lens import TunedLens, load_tuned_lens

__all__ = [
    "AuditResult",
    "LensTrainingSettings",
    "ManifoldOptions",
    "TunedLens",
    "collect_statistics",
    "compare_audits",
    "compare_dirs",
    "load_audit",
    "load_tuned_lens",
    "run_audit",
    "summarize_positions",
    "train_tuned_lens",
    "write_audit",
]
