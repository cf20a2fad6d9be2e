"""The numbers of a sweep: every per-run metric with its table header, kind (how it is printed) and definition."""

from __future__ import annotations

from ...stats.token_classes import CLASSES

# (key, table header, format). Per-run numbers first; net_attributable is computed from two runs.
PER_RUN_METRICS = (
    ("median_margin", "median margin", "number"),
    ("median_margin_change", "median margin change", "signed_percent"),
    ("pr_margin_lt_0_5", "Pr(m < 0.5)", "number"),
    ("gap_alpha", "alpha", "number"),
    ("gap_r_squared", "R^2", "r2"),
    ("gap_beta", "beta", "number"),
    ("entropy_margin_rho", "entropy-margin rho", "number"),
    ("accuracy", "accuracy", "percent"),
    ("churn", "churn", "percent"),
    ("w2r", "W->R", "count"),
    ("r2w", "R->W", "count"),
    ("flip_ratio", "flip ratio", "ratio"),
    ("net", "net", "count"),
    ("head_share", "head share", "percent"),
    ("structural_share", "structural share", "percent"),
) + tuple((f"net_{label}", label, "count") for label in CLASSES)
ATTRIBUTABLE = ("net_attributable", "net attributable", "signed_count")
METRICS = PER_RUN_METRICS + (ATTRIBUTABLE,)
METRIC_KEYS = tuple(key for key, _, _ in METRICS)
MAIN_TABLE = (
    "median_margin",
    "median_margin_change",
    "pr_margin_lt_0_5",
    "gap_alpha",
    "gap_r_squared",
    "accuracy",
    "churn",
    "w2r",
    "r2w",
    "flip_ratio",
    "net",
    "head_share",
    "structural_share",
    "net_attributable",
)
DESCRIPTIONS = {
    "median_margin": "median decision margin after refinement",
    "median_margin_change": "median(m after) / median(m before) - 1",
    "pr_margin_lt_0_5": "share of positions with margin < 0.5, after",
    "gap_alpha": "gap coefficient alpha of eta(eps) = alpha * eps, after",
    "gap_r_squared": "R^2 of the log-log gap fit, after",
    "gap_beta": "slope beta of the log-log gap fit eta ~ eps^beta, after",
    "entropy_margin_rho": "Spearman's rho of entropy and margin over the positions, after",
    "accuracy": "top-1 accuracy after",
    "churn": "share of positions whose top-1 token changed",
    "w2r": "positions wrong before, right after",
    "r2w": "positions right before, wrong after",
    "flip_ratio": "W->R / R->W (undefined when R->W = 0)",
    "net": "W->R - R->W",
    "head_share": "net of targets counted 100+ times in the audited blocks / net",
    "structural_share": "net of 'structural' targets (punctuation/symbols/whitespace) / net",
    "net_attributable": "net(run) - net(lambda = 0 control of the same seed)",
    **{f"net_{label}": f"net of targets of token class '{label}'" for label in CLASSES},
}

KINDS = {key: kind for key, _, kind in METRICS}
HEADERS = {key: header for key, header, _ in METRICS}
PAIRED_TABLE = ("net", "w2r", "r2w", "accuracy", "median_margin_change", "median_margin", "churn", "structural_share")

__all__ = [
    "PER_RUN_METRICS",
    "METRICS",
    "METRIC_KEYS",
    "MAIN_TABLE",
    "PAIRED_TABLE",
    "DESCRIPTIONS",
    "KINDS",
    "HEADERS",
]
