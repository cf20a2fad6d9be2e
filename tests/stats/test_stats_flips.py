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
            # float64 ratios and medians of the same numbers, numpy against a loop: <= n 2^-53 (n <= 200: 2e-14)
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


def per_class_naive(correct_before, correct_after, codes) -> dict[str, tuple[int, int, int, int]]:
    """{class: (n, W->R, R->W, net)}, counted one position at a time from the two correctness columns."""
    counts = {label: [0, 0, 0] for label in CLASSES}
    for before, after, code in zip(correct_before, correct_after, codes):
        row = counts[CLASSES[code]]
        row[0] += 1
        if not before and after:
            row[1] += 1
        if before and not after:
            row[2] += 1
    return {label: (n, w2r, r2w, w2r - r2w) for label, (n, w2r, r2w) in counts.items()}


def test_per_class_flips_equal_a_naive_count_and_add_up_to_the_headline():
    """Per-class W->R / R->W / net of every product path (FlipNumbers' net by class, the audit's class table, the
    callback's logged scalars) against a count written here, and summed over classes to the headline. Every class
    has W->R != R->W, so a class whose two counts are swapped cannot pass."""
    from hf_mrp.audit.flip_tables import Pair, class_breakdown, group_flips
    from hf_mrp.training.callbacks import breakdown_scalars, name_part

    rng = np.random.default_rng(3)
    n = 600
    codes = np.repeat(np.arange(len(CLASSES)), n // len(CLASSES))
    before = rng.random(n) < 0.5
    after = np.where(rng.random(n) < 0.6, before, ~before)
    want = per_class_naive(before.tolist(), after.tolist(), codes.tolist())
    assert all(w2r != r2w for _, w2r, r2w, _ in want.values())  # a swap changes every class's numbers
    assert sum(row[3] for row in want.values()) != 0  # shares are defined

    margins, top1 = rng.exponential(size=(2, n)), rng.integers(0, 5, (2, n))
    pair = Pair(codes, before, after, *margins, *top1, *rng.integers(0, 5, (2, n)))
    numbers = pair.numbers(np.zeros(n, bool), codes)
    table = class_breakdown(pair, codes, numbers.share_of_net)
    scalars = breakdown_scalars({"by_class": table})
    headline = (n, numbers.w2r, numbers.r2w, numbers.net)
    assert tuple(group_flips(pair)[key] for key in ("n", "w2r", "r2w", "net")) == headline
    for label in CLASSES:
        assert tuple(table[label][key] for key in ("n", "w2r", "r2w", "net")) == want[label], label
        assert numbers.net_by_class[label] == want[label][3], label
        logged = tuple(scalars[f"audit/class/{name_part(label)}/{key}"] for key in ("w2r", "r2w", "net"))
        assert logged == want[label][1:], label
    for i, key in enumerate(("n", "w2r", "r2w", "net")):
        assert sum(want[label][i] for label in CLASSES) == headline[i], key
