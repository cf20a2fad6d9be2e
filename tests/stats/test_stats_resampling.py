"""hf_mrp.stats: block bootstrap, paired intervals and seed t intervals against hand computations and scipy."""

import numpy as np
import pytest
from scipy import stats

from hf_mrp.stats import BlockIndex, block_bootstrap_distribution, block_resamples, paired_interval, seed_t_interval
from hf_mrp.stats.intervals import percentile_interval

# Tolerances: every pytest.approx here compares float64 arithmetic on the same numbers in another order (t intervals of
# a few seeds): within n 2^-53 of them (n < 10: 1e-15); pytest.approx's default (rel 1e-6) is nowhere near that limit on
# any machine.


def block_bootstrap_ci(statistic, blocks, n_resamples=1000, confidence=0.95, seed=0):
    """The percentile interval of the block bootstrap distribution, as the audit and the sweep take it."""
    return percentile_interval(block_bootstrap_distribution(statistic, blocks, n_resamples, seed), confidence)


def test_block_index_groups_positions_and_concatenates_drawn_blocks():
    blocks = BlockIndex.from_labels(np.array([5, 5, 9, 5, 9, 2]))  # blocks in label order: 2, 5, 9
    assert blocks.n_blocks == 3 and blocks.n_positions == 6
    assert blocks.sizes.tolist() == [1, 3, 2]
    assert blocks.positions_of(np.array([1, 1, 2, 0])).tolist() == [0, 1, 3, 0, 1, 3, 2, 4, 5]
    with pytest.raises(ValueError):
        BlockIndex.from_labels(np.array([]))


def test_two_clusters_by_hand():
    """Cluster A = positions 0-2 (values 1, 1, 1), cluster B = position 3 (value 4). A resample draws two
    clusters: AA -> mean 1, BB -> mean 4, AB or BA -> (1 + 1 + 1 + 4) / 4 = 1.75."""
    values = np.array([1.0, 1.0, 1.0, 4.0])
    blocks = BlockIndex.from_labels(np.array([0, 0, 0, 1]))
    n_resamples, seed = 2000, 7
    samples = block_bootstrap_distribution(lambda i: values[i].mean(), blocks, n_resamples, seed)
    draws = np.random.default_rng(seed).integers(0, 2, (n_resamples, 2))  # the same stream, drawn by hand
    expected = np.where(draws.sum(1) == 0, 1.0, np.where(draws.sum(1) == 2, 4.0, 1.75))
    np.testing.assert_array_equal(samples, expected)
    assert set(np.unique(samples)) == {1.0, 1.75, 4.0}
    # each of AA and BB has probability 1/4 > 2.5%, so the 95% percentile interval is [1, 4] exactly
    assert block_bootstrap_ci(lambda i: values[i].mean(), blocks, n_resamples, 0.95, seed) == (1.0, 4.0)
    sizes = [len(i) for i in block_resamples(blocks, 50, seed)]  # AA: 6 positions, AB: 4, BB: 2
    assert set(sizes) <= {2, 4, 6}


@pytest.mark.parametrize("statistic", [np.mean, np.median])
def test_blocks_of_one_position_are_scipys_percentile_bootstrap(statistic):
    x = np.random.default_rng(2).exponential(1.0, 700)
    blocks = BlockIndex.from_labels(np.arange(x.size))
    ours = block_bootstrap_ci(lambda i: statistic(x[i]), blocks, 600, confidence=0.9, seed=11)
    theirs = stats.bootstrap(
        (x,), statistic, n_resamples=600, confidence_level=0.9, method="percentile", rng=np.random.default_rng(11)
    ).confidence_interval
    # the same resamples (scipy's stream from the same seed), the same float64 statistic of 700 values (their sum
    # within 700 x 2^-53 = 8e-14 in another order) and the same percentile interpolation
    np.testing.assert_allclose([ours.low, ours.high], [theirs.low, theirs.high], rtol=1e-12)


def test_correlated_blocks_widen_the_interval():
    rng = np.random.default_rng(0)
    level = np.repeat(rng.normal(0, 1, 16), 255)  # 16 blocks, each with its own level
    x = level + rng.normal(0, 0.5, level.size)
    blocks = BlockIndex.from_labels(np.repeat(np.arange(16), 255))
    block = block_bootstrap_ci(lambda i: x[i].mean(), blocks, 400, seed=1)
    iid = block_bootstrap_ci(lambda i: x[i].mean(), BlockIndex.from_labels(np.arange(x.size)), 400, seed=1)
    assert (block.high - block.low) > 5 * (iid.high - iid.low)
    half = 1.96 * level[::255].std(ddof=1) / 4  # the cluster-level normal interval, roughly
    # not rounding (float64 on seeded draws: the same on any machine) but the bootstrap's own error: a percentile
    # half-width from R = 400 resamples has a Monte-Carlo sd of about 1 / sqrt(R) x 2 (tail quantiles) = 10%,
    # resampling 16 blocks shrinks it by sqrt(15 / 16) (3%), the within-block noise adds under 1%: 0.35 ~ 3 sd
    assert (block.high - block.low) / 2 == pytest.approx(half, rel=0.35)


def test_paired_interval_of_a_run_with_itself_is_zero_width():
    rng = np.random.default_rng(3)
    run = rng.random(500) < 0.3
    blocks = BlockIndex.from_labels(np.repeat(np.arange(10), 50))
    both = block_bootstrap_distribution(lambda i: np.array([run[i].sum(), run[i].sum()]), blocks, 300)
    low, high = paired_interval(both[:, 0], both[:, 1])
    assert low == high == 0.0
    with pytest.raises(ValueError):
        paired_interval(both[:, 0], both[:5, 1])


def test_pairing_narrows_the_difference_of_correlated_runs():
    rng = np.random.default_rng(4)
    control = rng.random(2000) < 0.4
    run = control ^ (rng.random(2000) < 0.05)  # differs from the control at ~5% of positions
    blocks = BlockIndex.from_labels(np.repeat(np.arange(40), 50))
    samples = block_bootstrap_distribution(lambda i: np.array([run[i].sum(), control[i].sum()]), blocks, 400)
    paired = paired_interval(samples[:, 0], samples[:, 1])
    unpaired_other = block_bootstrap_distribution(lambda i: control[i].sum(), blocks, 400, seed=99)
    unpaired = paired_interval(samples[:, 0], unpaired_other)
    assert paired.low <= run.sum() - control.sum() <= paired.high
    assert (paired.high - paired.low) < 0.5 * (unpaired.high - unpaired.low)


def test_seed_t_interval_by_hand():
    low, high = seed_t_interval(np.array([1.0, 2.0, 3.0]))
    half = 4.302652729911275 * 1.0 / np.sqrt(3)  # t_{2, 0.975} * sd / sqrt(n)
    assert (low, high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    low, high = seed_t_interval(np.array([4.0, np.nan, 6.0]), confidence=0.9)  # NaN seeds are left out
    half = 6.313751514675043 * np.sqrt(2) / np.sqrt(2)  # t_{1, 0.95} * sd / sqrt(n)
    assert (low, high) == (pytest.approx(5 - half), pytest.approx(5 + half))
    assert seed_t_interval(np.array([3.0])) is None
    assert seed_t_interval(np.array([2.0, 2.0])) == (2.0, 2.0)


def test_stats_imports_nothing_from_the_hf_stack():
    import subprocess
    import sys

    code = (
        "import sys, hf_mrp.stats; "
        "print([m for m in ('transformers', 'peft', 'accelerate', 'datasets') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
