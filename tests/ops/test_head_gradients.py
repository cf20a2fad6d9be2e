"""A top-k objective's part of W's gradient held as (ids, rows) until `combine` (head_gradients.RowsGradient): the
same [V x d] sum as a dense buffer, with a host or a device factor, before and after it folds into one."""

import pytest
import torch

from hf_mrp.ops.head_gradients import RowsGradient

from helpers import gamma


def parts(vocab: int, width: int, chunks: int, per_chunk: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, vocab, (per_chunk,), generator=generator),
            torch.randn(per_chunk, width, generator=generator),
        )
        for _ in range(chunks)
    ]


@pytest.mark.parametrize("factor_on_device", [False, True])
@pytest.mark.parametrize("per_chunk, folds", [(6, False), (40, True)])  # 3 x 6 < V = 50 rows; 3 x 40 >= V
def test_rows_gradient_adds_what_a_dense_buffer_would(per_chunk, folds, factor_on_device):
    vocab, width, factor = 50, 8, 0.37
    pieces = parts(vocab, width, 3, per_chunk)
    start = torch.randn(vocab, width)
    part = RowsGradient((vocab, width), torch.device("cpu"))
    for ids, rows in pieces:
        part.add_rows(ids, rows.clone())
    assert (part.dense is not None) == folds
    total = start.clone()
    part.add_to(total, torch.tensor(factor) if factor_on_device else factor)

    want, magnitude = start.double(), start.double().abs()
    for ids, rows in pieces:
        want = want.index_add(0, ids, factor * rows.double())
        magnitude = magnitude.index_add(0, ids, factor * rows.double().abs())
    # Each entry: a float32 sum of its start and at most 3 x per_chunk terms, each term one product (or a sum of the
    # terms then one product): gamma(n + 2) of the sum of the magnitudes, n the number of terms.
    bound = gamma(3 * per_chunk + 2) * magnitude
    assert ((total.double() - want).abs() <= bound).all()


def test_a_dense_part_after_rows_holds_both():
    vocab, width = 50, 4
    ((ids, rows),) = parts(vocab, width, 1, 5)
    part = RowsGradient((vocab, width), torch.device("cpu"))
    part.add_rows(ids, rows.clone())
    dense = part.to_dense()  # a full-logits objective's chunk adds into the same part
    dense += 1.0
    part.add_rows(ids, rows.clone())  # rows after it go straight into the buffer
    total = torch.zeros(vocab, width)
    part.add_to(total, 1.0)
    want = torch.ones(vocab, width, dtype=torch.float64).index_add(0, ids, 2 * rows.double())
    magnitude = torch.ones(vocab, width, dtype=torch.float64).index_add(0, ids, 2 * rows.double().abs())
    assert ((total.double() - want).abs() <= gamma(12) * magnitude).all()  # at most 10 terms + 1 per entry
