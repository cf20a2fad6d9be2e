"""A third reading of the audited layers is a `LayerReader` subclass: it plugs into the audit's one pass beside the
lenses and the manifold, its rows join layers.json's and its entry audit.json's, and the lens numbers do not move."""

import numpy as np
import pytest
import torch

from hf_mrp.audit import run_audit
from hf_mrp.audit.readers import LayerReader
from hf_mrp.data import Blocks
from hf_mrp.errors import MRPUserError

from helpers import VOCAB, build, gamma

pytestmark = pytest.mark.filterwarnings("ignore")


class HiddenNormReader(LayerReader):
    """Per layer: the mean Euclidean norm of the hidden states at the audited positions (float64 sums of the
    float32 norms), and how many batches were kept: a reader written outside hf_mrp."""

    name = "hidden_norm"

    def __init__(self, layers):
        super().__init__(layers)
        self.norms: dict[int, list[np.ndarray]] = {layer: [] for layer in self.layers}
        self.batches = 0

    def read(self, states, head):
        if self.kept_batch:
            self.batches += 1
            for layer in self.layers:
                self.norms[layer].append(states.hidden(layer).float().norm(dim=-1).cpu().numpy())

    def rows(self, positions, n_resamples):
        return {
            layer: {"mean_hidden_norm": float(np.concatenate(parts).astype(np.float64).mean())}
            for layer, parts in self.norms.items()
        }

    def entry(self):
        return {"hidden_norm_batches": self.batches}


def test_a_custom_reader_plugs_into_the_audit_pass():
    model = build("llama", num_hidden_layers=3)
    rows, length = 5, 13
    ids = np.random.default_rng(4).integers(3, VOCAB, size=(rows, length))
    blocks = Blocks(ids, rows * (length - 1) - 2, "random")
    plain = run_audit(model, blocks, layers="all", progress=False)
    reader = HiddenNormReader([0, 2])
    result = run_audit(model, blocks, layers="all", progress=False, readers=[reader], batch_size=rows)
    assert reader.batches == 1 and result.summary.layers["hidden_norm_batches"] == 1
    written = result.layers  # layers.json's "layers" (write_audit writes these rows as they are)
    for row, before in zip(written, plain.layers):  # the lens' keys are those of the audit without the reader
        assert {k: v for k, v in row.items() if k != "mean_hidden_norm"} == before
    with torch.no_grad():  # the model's own hidden states, one batch as the audit's (the final layer's normed)
        hidden = model(input_ids=torch.as_tensor(ids), output_hidden_states=True).hidden_states
    mask = torch.as_tensor(blocks.position_mask())
    n = int(mask.sum())
    for layer in (0, 2):
        norms = hidden[layer + 1][:, :-1][mask].double().norm(dim=-1)
        want = float(norms.mean())
        # the reader's norm is a float32 sum of squares of d terms (gamma(d) relative, halved by the root), its mean a
        # float64 sum of n terms (negligible): gamma(d) relative bounds the whole
        d = hidden[layer + 1].shape[-1]
        assert written[layer]["mean_hidden_norm"] == pytest.approx(want, rel=gamma(d) + gamma(n, 2.0**-53))
    assert "mean_hidden_norm" not in written[1]


def test_a_reader_outside_the_audited_layers_is_refused():
    model = build("llama")
    blocks = Blocks(np.random.default_rng(0).integers(3, VOCAB, size=(2, 9)), 16, "random")
    with pytest.raises(MRPUserError, match="some of the audited layers"):
        run_audit(model, blocks, layers=[0], progress=False, readers=[HiddenNormReader([2])])
    with pytest.raises(MRPUserError, match="LayerReader objects"):
        run_audit(model, blocks, layers=[0], progress=False, readers=[object()])
