"""stats.manifold on point clouds whose answer is known: exact neighbours (ties included), the intrinsic dimension
of a 3-dimensional linear subspace in 64 dimensions and of a swiss roll, duplicates, and too few points."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from hf_mrp.stats.manifold import ManifoldSettings, manifold_statistics, nearest_neighbours, sample_indices


def _reference_neighbours(points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    distance = cdist(points, points)
    np.fill_diagonal(distance, np.inf)
    order = np.argsort(distance, axis=1, kind="stable")[:, :k]  # stable: ties to the lower index
    return np.take_along_axis(distance, order, axis=1), order


@pytest.mark.parametrize("chunk_rows", [7, 128])
def test_nearest_neighbours_are_exact_with_ties_and_far_from_the_origin(chunk_rows):
    """A lattice (many exactly tied distances) shifted far from the origin (where Gram distances lose digits, so
    rows must fall back to every point): the same neighbours as cdist, ties to the lower index."""
    grid = np.stack(np.meshgrid(*[np.arange(5.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    points = np.concatenate([grid, np.zeros((len(grid), 5))], axis=1) + 1e6
    seen = []
    distances, indices = nearest_neighbours(points, 20, chunk_rows, progress=seen.append)
    want_d, want_i = _reference_neighbours(points, 20)
    np.testing.assert_array_equal(indices, want_i)
    np.testing.assert_allclose(distances, want_d, rtol=1e-9)  # differences of 1e6-sized coordinates: 1e-10 abs
    assert sum(seen) == len(points)


def test_nearest_neighbours_of_random_points():
    points = np.random.default_rng(1).normal(size=(300, 40))
    distances, indices = nearest_neighbours(points, 20, 64)
    want_d, want_i = _reference_neighbours(points, 20)
    np.testing.assert_array_equal(indices, want_i)
    np.testing.assert_allclose(distances, want_d, rtol=1e-12)  # same differences, summed in another order


def _linear_subspace(n: int = 2000) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)) @ rng.normal(size=(3, 64))


def _swiss_roll(n: int = 2000) -> np.ndarray:
    rng = np.random.default_rng(0)
    turn = 1.5 * np.pi * (1 + 2 * rng.uniform(size=n))
    return np.stack([turn * np.cos(turn), rng.uniform(0, 21, size=n), turn * np.sin(turn)], axis=1)


@pytest.mark.parametrize(("points", "truth"), [(_linear_subspace(), 3), (_swiss_roll(), 2)], ids=["subspace", "roll"])
def test_intrinsic_dimension_of_known_manifolds(points, truth):
    """The acceptance bound of issue 28: TwoNN and the MLE within 10% of the true dimension (2,000 points: the
    TwoNN estimator's relative standard error is about 1 / sqrt(N) = 2%, well inside it)."""
    found = manifold_statistics(points)
    for name in ("intrinsic_dimension_twonn", "intrinsic_dimension_mle"):
        assert abs(found[name] - truth) <= 0.1 * truth, (name, found[name])
    if truth == 3:  # a linear subspace: three components hold all the variance, and nothing is curved
        assert found["variance_dims"]["99"] == 3
        assert found["participation_ratio"] <= 3 + 1e-9  # the ratio is at most the rank


def test_duplicates_are_dropped_from_the_neighbour_statistics_and_counted():
    points = _linear_subspace(400)
    doubled = np.concatenate([points, points[:50]])
    found, alone = manifold_statistics(doubled), manifold_statistics(points)
    assert found["n_duplicates"] == 50 and found["n_points"] == 450
    for name in ("intrinsic_dimension_twonn", "intrinsic_dimension_mle", "curvature", "tangent_rotation"):
        assert found[name] == pytest.approx(alone[name], rel=1e-9)  # the same distinct points, centred anew


def test_too_few_distinct_points_give_nulls_and_k_is_clamped():
    found = manifold_statistics(np.ones((5, 4)))
    assert found["n_duplicates"] == 4 and found["participation_ratio"] is None
    assert found["intrinsic_dimension_twonn"] is None and found["curvature"] is None
    small = manifold_statistics(np.random.default_rng(0).normal(size=(8, 4)), ManifoldSettings(k=20))
    assert small["k"] == 7 and small["intrinsic_dimension_mle"] is not None


def test_sample_indices():
    np.testing.assert_array_equal(sample_indices(10, 10, 3), np.arange(10))
    drawn = sample_indices(100, 30, 3)
    expected = np.sort(np.random.default_rng(3).choice(100, size=30, replace=False))
    np.testing.assert_array_equal(drawn, expected)
