"""The audit's manifold statistics against an independent float64 computation (scipy's cdist and
subspace_angles, numpy's SVD) on the hidden states transformers returns, on two model families, for an audit that
reads every position and one that samples them; the flags and their refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles
from scipy.spatial.distance import cdist

from hf_mrp.audit import run_audit
from hf_mrp.audit.manifold import ManifoldOptions
from hf_mrp.data import Blocks
from hf_mrp.errors import MRPUserError

from helpers import build

# Two float64 computations of one statistic by different routes (Gram eigenvalues vs SVD, arccos of singular
# values vs scipy's sine-based angles) agree to about 1e-12 relative here; the acceptance bound is 1e-6.
RTOL = 1e-6


def audited_states(model, blocks: Blocks, layer: int) -> np.ndarray:
    """Layer ``layer``'s hidden states at the audited positions in audit order, from output_hidden_states (the
    decoder layer's output; the last one after the final norm), in one batch as the audit below runs it."""
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(blocks.input_ids), output_hidden_states=True, use_cache=False)
    states = out.hidden_states[layer + 1][:, :-1][torch.as_tensor(blocks.position_mask())]
    return states.double().numpy()


def reference(points: np.ndarray, k: int) -> dict:
    """Every statistic, written from the definitions in docs/spec.md."""
    centred = points - points.mean(axis=0)
    eig = np.linalg.svd(centred, compute_uv=False) ** 2
    cumulative = np.cumsum(eig) / eig.sum()
    found = {
        "participation_ratio": eig.sum() ** 2 / (eig**2).sum(),
        "variance_dims": {str(q): int(np.argmax(cumulative >= q / 100) + 1) for q in (50, 75, 90, 95, 99)},
    }
    first = {}
    for i, row in enumerate(points):
        first.setdefault(row.tobytes(), i)
    distinct = points[sorted(first.values())]
    found["n_duplicates"] = len(points) - len(distinct)
    distance = cdist(distinct, distinct)
    np.fill_diagonal(distance, np.inf)
    order = np.argsort(distance, axis=1, kind="stable")
    near = np.take_along_axis(distance, order, axis=1)
    found["intrinsic_dimension_twonn"] = (len(distinct) - 1) / np.log(near[:, 1] / near[:, 0]).sum()
    inverse = [np.mean(np.log(near[i, k - 1] / near[i, : k - 1])) for i in range(len(distinct))]
    found["intrinsic_dimension_mle"] = 1 / np.mean(inverse)
    found.update(reference_curvature(distinct, order, near))
    return found


def reference_curvature(points: np.ndarray, order: np.ndarray, near: np.ndarray) -> dict:
    """mrp-paper's curvature.py, defaults 16 neighbours, 0.95 of the variance, 4 plane neighbours, in float64."""
    m = min(16, len(points) - 1)
    residual, dims, bases = [], [], []
    for i in range(len(points)):
        hood = points[np.r_[i, order[i, :m]]]
        _, s, vt = np.linalg.svd(hood - hood.mean(axis=0), full_matrices=False)
        share = np.cumsum(s**2) / (s**2).sum()
        dim = int(np.argmax(share >= 0.95) + 1)
        residual.append((s[dim:] ** 2).sum() / (s**2).sum())
        dims.append(dim)
        bases.append((vt, int((s > 1e-12).sum())))
    q = int(np.median(dims))
    rotation = []
    for i in range(len(points)):
        scores = []
        for slot in range(4):
            j = order[i, slot]
            shared = min(q, bases[i][1], bases[j][1])
            angles = subspace_angles(bases[i][0][:shared].T, bases[j][0][:shared].T)
            scores.append(np.linalg.norm(angles) / np.sqrt(shared) / near[i, slot])
        rotation.append(np.mean(scores))
    return {"curvature": np.mean(residual), "tangent_rotation": np.mean(rotation), "tangent_dim": q}


def _blocks() -> Blocks:
    """Five blocks of random tokens, the fourth a copy of the first: its hidden states repeat (duplicates)."""
    ids = np.random.default_rng(0).integers(3, 97, size=(5, 33))
    ids[3] = ids[0]
    return Blocks(ids, 5 * 32 - 9, "random")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("positions", [10_000, 90], ids=["everything", "sampled"])
def test_manifold_statistics_match_an_independent_computation(family, positions, tmp_path):
    model, blocks = build(family, num_hidden_layers=3), _blocks()
    options = ManifoldOptions(positions=positions, k=12, seed=5)
    result = run_audit(model, blocks, output_dir=tmp_path, layers="all", manifold=options, batch_size=8, progress=False)
    n = blocks.n_positions
    sample = np.arange(n) if positions >= n else np.sort(np.random.default_rng(5).choice(n, positions, replace=False))
    rows = json.loads((tmp_path / "layers.json").read_text())["layers"]
    assert [row["layer"] for row in rows] == [0, 1, 2] and rows == json.loads(json.dumps(result.layers))
    duplicates = 0
    for row in rows:
        want = reference(audited_states(model, blocks, row["layer"])[sample], k=12)
        duplicates += want["n_duplicates"]
        assert row["n_points"] == len(sample) and row["k"] == 12
        assert row["variance_dims"] == want["variance_dims"] and row["tangent_dim"] == want["tangent_dim"]
        assert row["n_duplicates"] == want["n_duplicates"]
        for name in ("participation_ratio", "intrinsic_dimension_twonn", "intrinsic_dimension_mle", "curvature"):
            assert row[name] == pytest.approx(want[name], rel=RTOL), (row["layer"], name)
        assert row["tangent_rotation"] == pytest.approx(want["tangent_rotation"], rel=RTOL), row["layer"]
    if positions >= n:  # the copied block's 32 positions repeat at every layer
        assert duplicates == 3 * 32
    entry = result.summary.layers["manifold"]
    assert entry["sampled"] == (positions < n) and entry["sampled_positions"] == len(sample)
    assert [line["layer"] for line in entry["by_layer"]] == [0, 1, 2]
    assert (tmp_path / "manifold.png").stat().st_size > 0


def test_manifold_needs_layers_and_sane_options(tmp_path):
    model, blocks = build("llama"), _blocks()
    with pytest.raises(MRPUserError, match="per audited layer"):
        run_audit(model, blocks, manifold=True, progress=False)
    with pytest.raises(MRPUserError, match="manifold_positions"):
        ManifoldOptions(positions=2)
    from hf_mrp.research.arguments import AuditArguments, audit_options
    from hf_mrp.research.refine_arguments import RefineArguments

    with pytest.raises(MRPUserError, match="pass --layers"):
        AuditArguments(manifold=True)
    with pytest.raises(MRPUserError, match="pass --audit_layers"):
        RefineArguments(manifold=True)
    assert AuditArguments(manifold=True, layers="all", manifold_k=7).manifold_k == 7
    assert AuditArguments(manifold=True, lens="tuned", lens_path=str(tmp_path)).manifold  # the lens' layers
    # both commands' flags reach the audit as the same keywords
    options = {"batch_size": 3, "layers": "all", "manifold": ManifoldOptions(40, 7, 2)}
    flags = dict(manifold=True, manifold_positions=40, manifold_k=7, manifold_seed=2)
    assert audit_options(AuditArguments(batch_size=3, layers="all", **flags)) == options
    assert audit_options(RefineArguments(audit_batch_size=3, audit_layers="all", **flags), "audit_") == options
    assert audit_options(RefineArguments(), "audit_") == {"batch_size": 8, "layers": None, "manifold": None}


def test_correct_wrong_gap_and_its_block_bootstrap_interval(tmp_path):
    """audit.json's correct_wrong_gap: the two group means from the positions table, and the interval from whole
    blocks drawn with numpy's generator as docs/spec.md "Intervals" says, recomputed here by hand."""
    model, blocks = build("llama", head_scale=1.0), _blocks()
    run_audit(model, blocks, output_dir=tmp_path, progress=False)
    from hf_mrp.storage.files import read_parquet

    saved = json.loads((tmp_path / "audit.json").read_text())["correct_wrong_gap"]
    positions = read_parquet(tmp_path / "positions.parquet")
    margin, correct = positions["margin"].astype(np.float64), positions["correct"].astype(bool)
    assert 0 < correct.sum() < correct.size  # both groups present: the gap is defined
    assert saved["gap"] == pytest.approx(margin[correct].mean() - margin[~correct].mean(), rel=1e-12)
    labels = np.unique(positions["block"])
    members = [np.nonzero(positions["block"] == label)[0] for label in labels]
    draws = np.random.default_rng(0).integers(0, len(labels), (saved["n_resamples"], len(labels)))
    gaps = []
    for drawn in draws:
        index = np.concatenate([members[b] for b in drawn])
        m, c = margin[index], correct[index]
        gaps.append(m[c].mean() - m[~c].mean() if 0 < c.sum() < c.size else np.nan)
    gaps = np.asarray(gaps)
    want = np.quantile(gaps[np.isfinite(gaps)], [0.025, 0.975])
    np.testing.assert_allclose(saved["interval"], want, rtol=1e-12)  # the same draws: equal up to summation order
    assert saved["interval"][0] <= saved["gap"] <= saved["interval"][1]
