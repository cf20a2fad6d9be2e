"""The flip audit as an `evaluate` metric, loaded by local path, against a numpy recount."""

import numpy as np
import pytest

from hf_mrp.metrics import load_flip_audit

# Tolerances: every pytest.approx here compares float64 arithmetic on the same numbers in another order (ratios, shares
# and medians of 400 values): within n 2^-53 of them (n = 400: 4e-14); pytest.approx's default (rel 1e-6) is nowhere
# near that limit on any machine.


def test_flip_audit_metric_matches_a_recount():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 5, 400)
    before = np.where(rng.random(400) < 0.5, targets, rng.integers(0, 5, 400))
    after = np.where(rng.random(400) < 0.6, targets, rng.integers(0, 5, 400))
    margins_before, margins_after = rng.gamma(1.0, 1.0, 400), rng.gamma(1.2, 1.0, 400)
    metric = load_flip_audit()
    result = metric.compute(
        predictions=after,
        baseline_predictions=before,
        references=targets,
        margins=margins_after,
        baseline_margins=margins_before,
    )
    w2r = int(((before != targets) & (after == targets)).sum())
    r2w = int(((before == targets) & (after != targets)).sum())
    assert (result["w2r"], result["r2w"], result["net"]) == (w2r, r2w, w2r - r2w)
    assert result["flip_ratio"] == pytest.approx(w2r / r2w)
    assert result["churn"] == pytest.approx(np.mean(before != after))
    assert result["accuracy_after"] == pytest.approx(np.mean(after == targets))
    assert result["median_margin_change"] == pytest.approx(np.median(margins_after) / np.median(margins_before) - 1)


def test_no_position_is_refused_instead_of_nan_accuracies():
    with pytest.raises(ValueError, match="at least one position"):
        load_flip_audit().compute(predictions=[], baseline_predictions=[], references=[])
