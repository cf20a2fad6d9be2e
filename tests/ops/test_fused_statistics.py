"""The fused pass's TRL metrics (entropy, top-1 hits) against float64, and masked audit blocks."""

import numpy as np
import pytest
import torch

from hf_mrp.audit.geometry import load_audit, run_audit
from hf_mrp.data import Blocks, labeled_blocks
from hf_mrp.errors import MRPUserError
from hf_mrp.ops import MRPSettings, mrp_loss_sums
from hf_mrp.ops.transform import LogitTransform

from helpers import head_bounds


@pytest.mark.parametrize("objective", ["fisher", "entropy"])
@pytest.mark.parametrize(
    "transform", [LogitTransform(), LogitTransform(scale=1.5, softcap=3.0)], ids=lambda t: t.describe()
)
def test_entropy_and_top1_hits_match_float64_and_leave_the_loss_alone(objective, transform):
    torch.manual_seed(4)
    hidden, weight = torch.randn(3, 8, 6) * 2, torch.randn(29, 6)
    targets = torch.randint(0, 29, (3, 8))
    targets[0, :5] = -100
    with_stats = mrp_loss_sums(
        hidden,
        weight,
        targets,
        MRPSettings(objective=objective, lam=0.4, top_k=3, chunk_size=5, normalization="valid"),
        transform=transform,
        with_entropy=True,
    )
    plain = mrp_loss_sums(
        hidden,
        weight,
        targets,
        MRPSettings(objective=objective, lam=0.4, top_k=3, chunk_size=5, normalization="valid"),
        transform=transform,
    )
    valid = targets.reshape(-1) != -100
    z = transform.apply(hidden.reshape(-1, 6)[valid].double() @ weight.double().T)
    log_p = torch.log_softmax(z, -1)
    assert plain.entropy is None
    # float32 entropies (positive) summed against float64: a head of d = 6 (+2 roundings of the transform), V = 29
    want = float(-(log_p.exp() * log_p).sum())
    assert with_stats.entropy.item() == pytest.approx(want, rel=head_bounds(6 + 2, 29, 24)[0])
    hits = int((z.argmax(-1) == targets.reshape(-1)[valid]).sum())
    assert with_stats.n_correct == plain.n_correct == hits
    assert torch.equal(with_stats.total, plain.total) and torch.equal(with_stats.objective, plain.objective)


def test_labeled_blocks_audit_exactly_the_labeled_positions(model, tmp_path):
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    labels = [[-100, -100, 7, 8, -100], [-100, 11, 12]]
    blocks = labeled_blocks(rows, labels, pad_id=0, source="chats")
    assert blocks.n_positions == 4 and blocks.position_mask().tolist() == [
        [False, True, True, False],
        [True, True, False, False],
    ]
    result = run_audit(model, blocks, output_dir=tmp_path, progress=False)
    assert result.positions["target_id"].tolist() == [7, 8, 11, 12]
    assert result.positions["position"].tolist() == [1, 2, 0, 1]
    again = load_audit(tmp_path)
    assert again.blocks.fingerprint() == blocks.fingerprint() != Blocks(blocks.input_ids, 4, "chats").fingerprint()
    run_audit(model, Blocks(blocks.input_ids, 4, "chats"), output_dir=tmp_path, progress=False)
    assert load_audit(tmp_path).blocks.mask is None  # a later unmasked audit into the folder drops the old mask


def test_bad_masks_fail_in_one_line():
    ids = np.zeros((2, 4), dtype=np.int64)
    with pytest.raises(MRPUserError, match="n_positions"):
        Blocks(ids, 3, "x", mask=np.ones((2, 3), dtype=bool))
    with pytest.raises(MRPUserError, match="mask"):
        Blocks(ids, 2, "x", mask=np.ones((2, 4), dtype=bool))
    with pytest.raises(MRPUserError, match="label row"):
        labeled_blocks([[1, 2]], [[1]], pad_id=0)
