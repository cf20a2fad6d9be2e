"""hf_mrp.stats.flips: the one flip arithmetic of compare, the sweep and the metric, against a naive loop."""

import statistics

import numpy as np

from hf_mrp.stats.flips import flip_numbers, ratio
from hf_mrp.stats.token_classes import CLASSES


def naive(correct_before, correct_after, margin_before, margin_after, top1_before, top1_after, head, codes):
    w2r = sum(1 for b, a in zip(correct_before, correct_after) if not b and a)
    r2w = sum(1 for b, a in zip(correct_before, correct_after) if b and not a)
    sign = [int(a) - int(b) for b, a in zip(correct_before, correct_after)]
    net = w2r - r2w
    by_class = {label: sum(s for s, c in zip(sign, codes) if c == k) for k, label in enumerate(CLASSES)}
    before, after = statistics.median(margin_before), statistics.median(margin_after)
    return {
        "w2r": w2r,
        "r2w": r2w,
        "net": net,
        "flip_ratio": w2r / r2w if r2w else None,
        "churn": sum(b != a for b, a in zip(top1_before, top1_after)) / len(sign),
        "accuracy_before": sum(correct_before) / len(sign),
        "accuracy_after": sum(correct_after) / len(sign),
        "median_margin_before": before,
        "median_margin_after": after,
        "median_margin_change": after / before - 1 if before else None,
        "head_share": sum(s for s, h in zip(sign, head) if h) / net if net else None,
        "net_by_class": by_class,
        "share_of_net": {label: value / net if net else None for label, value in by_class.items()},
    }


def flatten(numbers: dict) -> dict:
    """The per-class dictionaries as top-level keys: 'structural' (net), 'share structural' (share of net)."""
    flat = {key: value for key, value in numbers.items() if not isinstance(value, dict)}
    flat.update(numbers["net_by_class"])
    flat.update({f"share {label}": value for label, value in numbers["share_of_net"].items()})
    return flat


def test_flip_numbers_equal_a_naive_loop():
    rng = np.random.default_rng(0)
    for n in (1, 7, 200):
        columns = (
            rng.random(n) < 0.4,
            rng.random(n) < 0.5,
            rng.exponential(size=n),
            rng.exponential(size=n),
            rng.integers(0, 4, n),
            rng.integers(0, 4, n),
            rng.random(n) < 0.3,
            rng.integers(0, len(CLASSES), n),
        )
        got, want = flip_numbers(*columns), naive(*(c.tolist() for c in columns))
        got, want = flatten(got.to_json()), flatten(want)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert (got[key] is None) == (value is None), key
            assert value is None or abs(got[key] - value) < 1e-12, key
        assert all(type(got[key]) is int for key in ("w2r", "r2w", "net", *CLASSES))


def test_undefined_numbers_are_none_and_zero_is_never_negative():
    no_flips = flip_numbers(
        *[np.array([True, False])] * 2,
        np.ones(2),
        np.ones(2),
        np.zeros(2),
        np.zeros(2),
        np.ones(2, bool),
        np.zeros(2, np.int64),
    )
    assert no_flips.flip_ratio is None and no_flips.head_share is None and no_flips.net == 0
    assert no_flips.share_of_net["structural"] is None
    assert ratio(0, -3) == 0.0 and str(ratio(0, -3)) == "0.0"  # no "-0.0" in a report
    assert (
        flip_numbers(
            np.array([False]), np.array([True]), np.zeros(1), np.ones(1), np.zeros(1), np.ones(1), np.zeros(1, bool)
        ).relative_median_margin_change
        is None
    )  # a change from a zero median
