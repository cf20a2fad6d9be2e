"""A collapsed model (every logit tied: every margin 0, every entropy log V) is audited, compared and drawn without
a warning: the correlations of its constant columns are undefined (NaN, scipy is not asked) and its empty gap
curve gets no legend (matplotlib is not asked for one)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from hf_mrp.audit.compare import compare_audits, write_comparison
from hf_mrp.audit.geometry import run_audit
from hf_mrp.stats.correlation import is_constant, spearman

from helpers import tiny_llama


def test_spearman_is_scipys_where_defined_and_nan_where_not():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(spearman(np.zeros(50), y)) and math.isnan(spearman(x, np.full(50, 3.0)))
        assert math.isnan(spearman(x[:1], y[:1]))
    assert is_constant(np.zeros(3)) and not is_constant(np.array([0.0, np.nan])) and not is_constant(x)


def test_a_collapsed_model_is_audited_compared_and_drawn_without_a_warning(blocks, tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the collapse a diverged run can end in
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's ConstantInputWarning, matplotlib's legend warning, any other
        before = run_audit(model, blocks, output_dir=tmp_path / "before", progress=False, layers="0-2")
        after = run_audit(model, blocks, output_dir=tmp_path / "after", progress=False, layers="0-2")
        write_comparison(compare_audits(before, after), before, after, tmp_path / "comparison")
    assert before.summary.median_margin == 0.0 and math.isnan(before.summary.entropy_margin_spearman)
    assert (tmp_path / "before" / "gap_curve.png").is_file() and (tmp_path / "comparison" / "gap_curves.png").is_file()
