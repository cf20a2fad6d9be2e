"""The hidden-state manifold of one layer, from a sample of its positions (docs/spec.md, "Manifold statistics").

Everything here is float64 numpy on an [n_points x hidden] array, so it can be checked against an independent
float64 computation. Principal components (participation ratio, dimensions per variance level) use every sampled
position; the neighbour statistics (TwoNN, Levina-Bickel, local curvature) use the distinct points only, in sample
order, since a repeated hidden state (a repeated prefix) has a zero nearest-neighbour distance that no local
estimator is defined on: the duplicates are dropped and counted.

Nearest neighbours are exact: candidates come from chunked Gram distances (memory rows x n_points), their
distances are recomputed from differences, and a row whose candidates cannot be shown to hold its k nearest under
the Gram rounding bound is recomputed against every point. Ties go to the lower index.

The curvature is the released code's local-PCA measure (mellowmarshall/mrp-paper ``src/mrp/curvature.py``, with
its command-line defaults): see `local_curvature`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

VARIANCE_LEVELS = (50, 75, 90, 95, 99)  # percent of the variance: `variance_dims` keys
NEAR = 1e-6  # the released code's distance below which a neighbour's tangent plane is not compared
RANK_FLOOR = 1e-12  # the released code's singular value below which a direction is not part of a local basis
EXTRA_CANDIDATES = 16  # Gram candidates beyond the k wanted: rows recomputed in full are then rare


@dataclass(frozen=True)
class ManifoldSettings:
    """The estimators' settings: Levina-Bickel neighbours, and the released curvature's three (its cli.py
    defaults: --neighbor-count 16, --variance-threshold 0.95, --plane-neighbors 4)."""

    k: int = 20
    curvature_neighbors: int = 16
    variance_threshold: float = 0.95
    plane_neighbors: int = 4
    chunk_rows: int = 128


def sample_indices(n_positions: int, max_positions: int, seed: int) -> np.ndarray:
    """The audited positions a manifold statistic reads: all of them in audit order when there are at most
    ``max_positions``, else ``max_positions`` of them drawn without replacement (seeded), sorted."""
    if n_positions <= max_positions:
        return np.arange(n_positions, dtype=np.int64)
    chosen = np.random.default_rng(seed).choice(n_positions, size=max_positions, replace=False)
    return np.sort(chosen).astype(np.int64)


def pca_statistics(points: np.ndarray) -> dict:
    """The participation ratio (sum eig)^2 / sum eig^2 of the centred covariance, and the number of principal
    components whose variance reaches each level of VARIANCE_LEVELS (None where all points coincide)."""
    centred = points - points.mean(axis=0)
    # the nonzero eigenvalues of C^T C and C C^T are the same: the smaller of the two is decomposed
    small = centred.T @ centred if centred.shape[0] >= centred.shape[1] else centred @ centred.T
    eig = np.maximum(np.linalg.eigvalsh(small)[::-1], 0.0) / max(len(points) - 1, 1)
    total = float(eig.sum())
    if len(points) < 2 or total <= 0.0:
        return {"participation_ratio": None, "variance_dims": None}
    cumulative = np.cumsum(eig) / total
    dims = {
        str(level): int(min(np.searchsorted(cumulative, level / 100.0, side="left") + 1, eig.size))
        for level in VARIANCE_LEVELS
    }
    return {"participation_ratio": total**2 / float((eig**2).sum()), "variance_dims": dims}


def distinct_points(points: np.ndarray) -> tuple[np.ndarray, int]:
    """The distinct rows in their first order of appearance, and how many repeated rows were dropped."""
    _, first = np.unique(points, axis=0, return_index=True)
    keep = np.sort(first)
    return points[keep], int(len(points) - keep.size)


def nearest_neighbours(
    points: np.ndarray, k: int, chunk_rows: int = 128, progress: Callable[[int], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices) [n x k] of each point's k nearest other points, ascending, exact (module docstring).
    ``progress`` is called with the number of rows finished after each chunk."""
    n = len(points)
    squared = np.einsum("ij,ij->i", points, points)
    norms = np.sqrt(squared)
    # |Gram d^2 - d^2| <= (d + 2) u (|x| + |y|)^2 for a dot product of d terms in unit roundoff u (Higham 3.5).
    slack = (points.shape[1] + 2) * np.finfo(np.float64).eps / 2
    wanted = min(n - 1, k + EXTRA_CANDIDATES)
    distances, indices = np.empty((n, k)), np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk_rows):
        rows = np.arange(start, min(start + chunk_rows, n))
        gram = squared[rows, None] + squared[None, :] - 2.0 * points[rows] @ points.T
        gram[np.arange(rows.size), rows] = -np.inf  # first: a point's own column is always a candidate
        pool = np.argpartition(gram, wanted, axis=1)[:, : wanted + 1]
        found_d, found_i = _exact_nearest(points, rows, pool, k)
        lower = gram - slack * (norms[rows, None] + norms[None, :]) ** 2
        np.put_along_axis(lower, pool, np.inf, axis=1)
        # a row is settled when no point outside its pool can be as near as its k-th (a relative 1e-12 margin
        # covers the rounding of the recomputed distance itself)
        unsettled = np.nonzero(lower.min(axis=1) <= found_d[:, -1] ** 2 * (1 + 1e-12))[0]
        for i in unsettled if wanted < n - 1 else ():
            every = np.arange(n)[None, :]
            found_d[i], found_i[i] = (part[0] for part in _exact_nearest(points, rows[i : i + 1], every, k))
        distances[rows], indices[rows] = found_d, found_i
        if progress is not None:
            progress(int(rows.size))
    return distances, indices


def _exact_nearest(points: np.ndarray, rows: np.ndarray, pool: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest of its ``pool`` (a row of candidate indices, which may hold the row itself) by distances
    computed from differences; ties go to the lower index."""
    distance = np.sqrt(((points[pool] - points[rows][:, None, :]) ** 2).sum(axis=2))
    distance[pool == rows[:, None]] = np.inf
    order = np.lexsort((pool, distance), axis=1)[:, :k]
    return np.take_along_axis(distance, order, axis=1), np.take_along_axis(pool, order, axis=1)


def twonn_dimension(distances: np.ndarray) -> float | None:
    """TwoNN (Facco et al. 2017), maximum likelihood: (N - 1) / sum log(r2 / r1) over points with r1 > 0."""
    r1, r2 = distances[:, 0], distances[:, 1]
    keep = r1 > 0
    total = float(np.log(r2[keep] / r1[keep]).sum())
    return (int(keep.sum()) - 1) / total if keep.sum() > 1 and total > 0 else None


def mle_dimension(distances: np.ndarray, k: int) -> float | None:
    """Levina-Bickel with k neighbours, each point's inverse estimate (1 / (k-1)) sum_{j<k} log(T_k / T_j)
    averaged over points and inverted (MacKay and Ghahramani's correction of averaging the estimates)."""
    near = distances[:, :k]
    inverse = np.log(near[:, k - 1 : k] / near[:, : k - 1]).sum(axis=1) / (k - 1)
    mean = float(inverse.mean())
    return 1.0 / mean if mean > 0 else None


def local_curvature(
    points: np.ndarray, neighbours: np.ndarray, distances: np.ndarray, settings: ManifoldSettings
) -> dict:
    """The released code's local-PCA curvature (``curvature.py``, ``_analyze_layer``), in float64.

    Each point with its m = min(curvature_neighbors, n - 1) nearest neighbours is centred and decomposed; its local
    dimension is the fewest components holding ``variance_threshold`` of that neighbourhood's variance, and its
    curvature the fraction of the variance outside them (0 for a neighbourhood of one point). The layer's tangent
    dimension q is the median local dimension; each point's tangent plane is its neighbourhood's first q directions
    (fewer where the neighbourhood has lower rank), and its tangent rotation is the mean, over its first
    ``plane_neighbors`` neighbours farther than 1e-6, of the root-mean-square principal angle between the two planes
    divided by their distance (the released "second fundamental form proxy").

    Returns the means over points of the curvature and the tangent rotation, and q.
    """
    m = min(max(2, settings.curvature_neighbors), len(points) - 1)
    plane = min(max(1, settings.plane_neighbors), m)
    hood = np.concatenate([np.arange(len(points))[:, None], neighbours[:, :m]], axis=1)
    residual, local_dim = np.zeros(len(points)), np.ones(len(points), dtype=np.int64)
    for rows, singular, _ in _neighbourhoods(points, hood, settings.chunk_rows, vectors=False):
        variance = singular**2
        total = variance.sum(axis=1)
        cumulative = np.cumsum(variance, axis=1) / np.where(total > 0, total, 1.0)[:, None]
        dims = np.minimum((cumulative < settings.variance_threshold).sum(axis=1) + 1, variance.shape[1])
        tail = np.where(np.arange(variance.shape[1])[None, :] >= dims[:, None], variance, 0.0).sum(axis=1)
        residual[rows] = np.where(total > 0, tail / np.where(total > 0, total, 1.0), 0.0)
        local_dim[rows] = np.where(total > 0, dims, 1)
    q = max(1, min(int(np.median(local_dim)), m))
    bases, ranks = np.empty((len(points), q, points.shape[1])), np.empty(len(points), dtype=np.int64)
    for rows, singular, vt in _neighbourhoods(points, hood, settings.chunk_rows, vectors=True):
        bases[rows] = vt[:, :q]
        ranks[rows] = np.maximum(1, np.minimum(q, (singular > RANK_FLOOR).sum(axis=1)))
    rotation = _tangent_rotations(bases, ranks, neighbours, distances, plane, settings.chunk_rows)
    return {"curvature": float(residual.mean()), "tangent_rotation": float(rotation.mean()), "tangent_dim": q}


def _neighbourhoods(points: np.ndarray, hood: np.ndarray, chunk_rows: int, vectors: bool):
    """(rows, singular values, right singular vectors or None) of the centred neighbourhoods, chunk by chunk,
    from the eigendecomposition of each neighbourhood's small Gram matrix C C^T ((m+1) x (m+1)): LAPACK's batched
    SVD of wide (m+1) x hidden matrices is two orders of magnitude slower. A singular value s carries an absolute
    error of about sqrt(u) s_max this way, which only the rank floor can see (see ``local_curvature``)."""
    for start in range(0, len(points), chunk_rows):
        rows = np.arange(start, min(start + chunk_rows, len(points)))
        block = points[hood[rows]]
        centred = block - block.mean(axis=1, keepdims=True)
        eig, u = np.linalg.eigh(centred @ centred.transpose(0, 2, 1))
        eig, u = np.maximum(eig[:, ::-1], 0.0), u[:, :, ::-1]
        singular = np.sqrt(eig)
        if not vectors:
            yield rows, singular, None
            continue
        vt = u.transpose(0, 2, 1) @ centred / np.where(singular > 0, singular, 1.0)[:, :, None]
        yield rows, singular, vt


def _tangent_rotations(
    bases: np.ndarray, ranks: np.ndarray, neighbours: np.ndarray, distances: np.ndarray, plane: int, chunk_rows: int
) -> np.ndarray:
    """Each point's mean RMS principal angle to its first ``plane`` neighbours' planes per unit distance (0 when
    every such neighbour is within 1e-6); the angles are the arccos of the singular values of B_i B_j^T over the
    first min(rank_i, rank_j) directions of each plane. Chunked: memory rows x plane x q x hidden."""
    n, q = len(bases), bases.shape[1]
    score, counted = np.zeros((n, plane)), distances[:, :plane] > NEAR
    for start in range(0, n, chunk_rows):
        rows = np.arange(start, min(start + chunk_rows, n))
        mates = neighbours[rows, :plane]
        overlap = np.einsum("iad,ijbd->ijab", bases[rows], bases[mates])
        cosines = np.clip(np.linalg.svd(overlap, compute_uv=False), -1.0, 1.0)
        score[rows] = np.linalg.norm(np.arccos(cosines), axis=2) / np.sqrt(q)
        for i, slot in zip(*np.nonzero(np.minimum(ranks[rows, None], ranks[mates]) < q)):  # a plane of lower rank
            shared = int(min(ranks[rows[i]], ranks[mates[i, slot]]))
            small = bases[rows[i], :shared] @ bases[mates[i, slot], :shared].T
            angles = np.arccos(np.clip(np.linalg.svd(small, compute_uv=False), -1.0, 1.0))
            score[rows[i], slot] = np.linalg.norm(angles) / np.sqrt(shared)
    score = np.where(counted, score / np.where(counted, distances[:, :plane], 1.0), 0.0)
    return np.where(counted.any(axis=1), score.sum(axis=1) / np.maximum(counted.sum(axis=1), 1), 0.0)


def manifold_statistics(
    points: np.ndarray, settings: ManifoldSettings | None = None, progress: Callable[[int], None] | None = None
) -> dict:
    """Every statistic of one layer from its sampled hidden states [n x hidden] (cast to float64): the principal
    components' over all of them, the neighbour statistics' over the distinct ones (``n_duplicates`` dropped).
    A statistic that needs more distinct points than there are is None. ``progress`` counts neighbour rows."""
    settings = settings or ManifoldSettings()
    points = np.asarray(points, dtype=np.float64)
    found: dict = {"n_points": int(len(points)), **pca_statistics(points)}
    distinct, found["n_duplicates"] = distinct_points(points)
    k = min(settings.k, len(distinct) - 1)
    found["k"] = int(k)
    found.update(intrinsic_dimension_twonn=None, intrinsic_dimension_mle=None)
    found.update(curvature=None, tangent_rotation=None, tangent_dim=None)
    if len(distinct) < 3:
        return found
    wanted = min(max(k, settings.curvature_neighbors, 2), len(distinct) - 1)
    distinct = distinct - distinct.mean(axis=0)  # distances do not move; the Gram rounding bound shrinks
    distances, neighbours = nearest_neighbours(distinct, wanted, settings.chunk_rows, progress)
    found["intrinsic_dimension_twonn"] = twonn_dimension(distances)
    found["intrinsic_dimension_mle"] = mle_dimension(distances, k) if k >= 2 else None
    found.update(local_curvature(distinct, neighbours, distances, settings))
    return found
