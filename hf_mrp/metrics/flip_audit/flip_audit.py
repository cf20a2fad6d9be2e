"""Flip audit as an `evaluate` metric: corrections and collateral damage between two runs.

    import evaluate
    flip = evaluate.load("path/to/hf_mrp/metrics/flip_audit/flip_audit.py")   # or hf_mrp.metrics.load_flip_audit()
    flip.compute(predictions=after_top1, baseline_predictions=before_top1, references=targets,
                 margins=after_margins, baseline_margins=before_margins)     # margins optional

The numbers are hf_mrp's own (`hf_mrp.stats.flips`, which `hf-mrp compare` uses), so they equal `hf-mrp compare`'s.
"""

import datasets
import evaluate
import numpy as np

from hf_mrp.stats.flips import flip_numbers

_DESCRIPTION = """Before/after flip audit of next-token predictions at the same positions: W->R (corrections),
R->W (collateral damage), net, flip ratio, top-1 churn, accuracy before/after and, with margins, the
median margin change (arXiv 2604.06767)."""

_KWARGS = """
Args:
    predictions: top-1 token ids of the refined model, one per position.
    baseline_predictions: top-1 token ids of the base model at the same positions.
    references: target token ids.
    margins / baseline_margins (optional): top-1 minus top-2 logit of each model.
Returns: w2r, r2w, net, flip_ratio (None when r2w = 0), churn, accuracy_before, accuracy_after,
    and with margins median_margin_before, median_margin_after, median_margin_change.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class FlipAudit(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="arXiv:2604.06767",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "baseline_predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, baseline_predictions, references, margins=None, baseline_margins=None):
        after, before, target = (np.asarray(x, dtype=np.int64) for x in (predictions, baseline_predictions, references))
        if target.size == 0:  # accuracies and churn of no position would be NaN
            raise ValueError(
                "flip_audit needs at least one position: predictions, baseline_predictions and references are empty"
            )
        zeros = np.zeros(target.shape)
        numbers = flip_numbers(
            before == target,
            after == target,
            zeros if baseline_margins is None else np.asarray(baseline_margins, dtype=np.float64),
            zeros if margins is None else np.asarray(margins, dtype=np.float64),
            before,
            after,
            head=np.zeros(target.shape, dtype=bool),
        )
        keys = ("w2r", "r2w", "net", "flip_ratio", "churn", "accuracy_before", "accuracy_after")
        if margins is not None and baseline_margins is not None:
            keys += ("median_margin_before", "median_margin_after", "median_margin_change")
        return {key: numbers.to_json()[key] for key in keys}
