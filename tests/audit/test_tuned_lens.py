"""The tuned lens: training lowers the per-layer KL below the logit lens' on held-out positions; saving, loading,
resuming and a 2-process run equal one uninterrupted process; bad lens folders and overlaps are refused."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_mrp.audit import run_audit
from hf_mrp.audit.lens_training import LensTrainingSettings, train_tuned_lens
from hf_mrp.audit.tuned_lens import (
    last_target_token,
    layer_spans,
    load_tuned_lens,
    positions_before,
    training_start_token,
)
from hf_mrp.data import Blocks
from hf_mrp.errors import MRPUserError
from hf_mrp.research.arguments import AuditArguments

from helpers import FAMILIES, VOCAB, build, launched, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[2]


def random_blocks(rows: int, seed: int, length: int = 24) -> Blocks:
    ids = np.random.default_rng(seed).integers(3, VOCAB, size=(rows, length))
    return Blocks(ids, rows * (length - 1), f"random-{seed}")


def flat(row: dict, prefix: str = "") -> dict:
    """A layers.json row's numbers by dotted name (pytest.approx compares flat mappings only)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            out.update({f"{prefix}{key}.{i}": v for i, v in enumerate(value)})
        else:
            out[f"{prefix}{key}"] = value
    return out


def train(model, folder, steps=4, **overrides):
    settings = LensTrainingSettings(
        **{**dict(max_steps=steps, batch_positions=64, learning_rate=1e-2, save_steps=2, chunk_size=32), **overrides}
    )
    return train_tuned_lens(
        model, random_blocks(12, seed=1), folder, model_name="tiny", settings=settings, progress=False
    )


def test_a_trained_tuned_lens_lowers_every_layers_kl_below_the_logit_lens_on_held_out_positions(tmp_path):
    model = tiny_llama(layers=4)
    lens = train_tuned_lens(
        model,
        random_blocks(40, seed=1),
        tmp_path / "lens",
        model_name="tiny",
        progress=False,
        settings=LensTrainingSettings(max_steps=60, batch_positions=256, learning_rate=1e-2),
    )
    assert lens.layers == [0, 1, 2]  # the last layer is the model's output: no translator
    held_out = random_blocks(8, seed=2)
    result = run_audit(model, held_out, layers="all", lens=lens, progress=False)
    for tuned, logit in zip(result.layers, result.logit_layers):
        assert tuned["layer"] == logit["layer"]
        if tuned["layer"] < 3:
            assert tuned["mean_kl_to_final"] < 0.8 * logit["mean_kl_to_final"], (tuned["layer"], tuned, logit)
        else:
            assert tuned["mean_kl_to_final"] == logit["mean_kl_to_final"] == 0.0
    assert result.summary.layers["lens"] == "tuned"


def test_saving_loading_and_resuming_equal_one_uninterrupted_run(tmp_path):
    model = tiny_llama(layers=3)
    whole = train(model, tmp_path / "whole", steps=4)
    train(model, tmp_path / "cut", steps=2)  # stopped after 2 steps...
    resumed = train(model, tmp_path / "cut", steps=4)  # ...and rerun into the same folder: resumes from step 2
    loaded = load_tuned_lens(tmp_path / "cut")
    # Exact: the same computation in one process (same blocks, shapes and seed; the checkpoint restores the
    # translators and the optimizer's state to the bit), so no tolerance (none would be a rounding bound under Adam)
    for group in ("weights", "biases"):
        for a, b, c in zip(
            getattr(whole.translators, group), getattr(resumed.translators, group), getattr(loaded.translators, group)
        ):
            assert a.abs().sum() > 0
            assert torch.equal(a.detach(), b.detach())
            assert torch.equal(b.detach(), c.detach())
    log = json.loads((tmp_path / "cut" / "lens_config.json").read_text())["log"]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    assert [row["mean_kl"] for row in log] == [row["mean_kl"] for row in whole.config["log"]]
    blocks = random_blocks(4, seed=5)
    in_memory = run_audit(model, blocks, lens=whole, progress=False)
    from_disk = run_audit(model, blocks, lens=loaded, progress=False)
    for a, b in zip(in_memory.layers, from_disk.layers):  # equal translators: the same audit
        assert flat(a) == flat(b)


def test_refusals_name_the_problem(tmp_path):
    model = tiny_llama(layers=3)
    train(model, tmp_path / "lens", steps=2)
    with pytest.raises(MRPUserError, match="trained with other settings .*settings.learning_rate"):
        train(model, tmp_path / "lens", steps=3, learning_rate=0.5)
    lens = load_tuned_lens(tmp_path / "lens")
    with pytest.raises(MRPUserError, match="among the tuned lens' training blocks"):
        run_audit(model, random_blocks(12, seed=1), lens=lens, progress=False)
    with pytest.raises(MRPUserError, match="trained for a model with"):
        run_audit(tiny_llama(layers=4), random_blocks(3, seed=7), lens=lens, progress=False)
    with pytest.raises(MRPUserError, match="no translator for layer 0"):
        partial = train_tuned_lens(
            model,
            random_blocks(4, seed=1),
            tmp_path / "partial",
            model_name="tiny",
            layers=[1],
            settings=LensTrainingSettings(max_steps=1),
            progress=False,
        )
        run_audit(model, random_blocks(3, seed=7), layers="0-2", lens=partial, progress=False)
    with pytest.raises(MRPUserError, match="holds no tuned lens"):
        load_tuned_lens(tmp_path / "nothing")
    (tmp_path / "lens" / "lens.safetensors").unlink()
    with pytest.raises(MRPUserError, match="lens.safetensors is missing"):
        load_tuned_lens(tmp_path / "lens")
    with pytest.raises(MRPUserError, match="--lens tuned needs --lens_path"):
        AuditArguments(lens="tuned")
    with pytest.raises(MRPUserError, match="unknown lens 'tuneed'"):
        AuditArguments(lens="tuneed")
    with pytest.raises(MRPUserError, match="--lens_path is read with --lens tuned only"):
        AuditArguments(lens_path=str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_training_steps_move_the_translators_on_every_family(tmp_path, family):
    """Gradients reach the translators through each family's final norm, head and logit transform."""
    model = build(family)
    blocks = Blocks(np.random.default_rng(0).integers(3, VOCAB, size=(4, 12)), 44, "random")
    lens = train_tuned_lens(
        model,
        blocks,
        tmp_path,
        model_name=family,
        progress=False,
        settings=LensTrainingSettings(max_steps=2, batch_positions=32, learning_rate=1e-2),
    )
    assert all(weight.abs().sum() > 0 for weight in lens.translators.weights)
    log = lens.config["log"]
    assert len(log) == 2 and all(np.isfinite(row["mean_kl"]) and row["mean_kl"] > 0 for row in log)
    assert all(p.requires_grad for p in model.parameters())  # the model's own flags are restored


def _naive_stream_offsets(holdout: int, lens_block: int, n_positions: int, audit_block: int) -> tuple[int, int]:
    """(first token the lens trains on, last token the audit reads), by walking the positions one by one."""
    skipped_rows = len({position // (lens_block - 1) for position in range(holdout)})  # the rows the holdout reads
    read = [row * audit_block + column + 1 for row, column in (divmod(p, audit_block - 1) for p in range(n_positions))]
    return skipped_rows * lens_block, max(read)


@pytest.mark.parametrize("holdout, lens_block, audit_block", [(124, 32, 16), (30, 16, 8), (31, 16, 40), (0, 8, 8)])
def test_stream_offsets_equal_a_position_by_position_walk(holdout, lens_block, audit_block):
    start = training_start_token(holdout, lens_block)
    allowed = positions_before(start, audit_block)
    for n in range(1, 3 * lens_block + holdout):
        first, last = _naive_stream_offsets(holdout, lens_block, n, audit_block)
        assert (start, last_target_token(n, audit_block)) == (first, last), n
        assert (n <= allowed) == (last < first), (n, allowed)  # the largest audit that reads no training token


def test_an_audit_at_another_block_size_that_reaches_the_lens_training_text_is_refused(tmp_path):
    """Blocks cut from one token stream at another block size share no identical block with the lens' own, so
    only the stream offsets tell that the audit reads the lens' training text."""
    model = tiny_llama(layers=3)
    stream = np.random.default_rng(3).integers(3, VOCAB, size=640)
    holdout, start = 45, training_start_token(45, 16)  # 3 blocks of 16 held out: training starts at token 48
    train_tuned_lens(
        model,
        Blocks(stream[start : start + 16 * 20].reshape(20, 16), 20 * 15, "one stream"),
        tmp_path / "lens",
        model_name="tiny",
        settings=LensTrainingSettings(max_steps=1, batch_positions=32, chunk_size=32),
        holdout_positions=holdout,
        stream_start_token=start,
        progress=False,
    )
    lens = load_tuned_lens(tmp_path / "lens")
    allowed = positions_before(start, 10)  # 4 blocks of 10 and 7 positions of the fifth: tokens 0-47
    audit_blocks = stream[:100].reshape(10, 10)
    run_audit(model, Blocks(audit_blocks, allowed, "one stream"), lens=lens, progress=False)
    with pytest.raises(MRPUserError, match=f"reads tokens 0-48 of one stream.*audit at most {allowed} positions"):
        run_audit(model, Blocks(audit_blocks, allowed + 1, "one stream"), lens=lens, progress=False)
    run_audit(model, Blocks(audit_blocks, 90, "another stream"), lens=lens, progress=False)  # no offsets to compare


def _cli(nproc: int, argv: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    return launched(["-m", "hf_mrp.research.cli", *argv], processes=nproc, env=env).stdout


def test_two_processes_train_and_audit_through_the_lens_as_one(tiny_model_dir, tmp_path, capsys):
    data = ["--model", str(tiny_model_dir), "--block_size", "32"]
    for nproc in (1, 2):
        lens = tmp_path / f"lens{nproc}"
        trained = _cli(
            nproc,
            [
                "lens",
                "train",
                *data,
                "--max_positions",
                "155",
                "--holdout_positions",
                "124",
                "--max_steps",
                "3",
                "--batch_positions",
                "50",
                "--chunk_size",
                "16",
                "--learning_rate",
                "0.01",
                "--output_dir",
                str(lens),
            ],
        )
        audited = _cli(
            nproc,
            [
                "audit",
                *data,
                "--max_positions",
                "124",
                "--batch_size",
                "1",
                "--lens",
                "tuned",
                "--lens_path",
                str(tmp_path / "lens1"),  # one lens for both audits: the audit's sharding alone is compared
                "--output_dir",
                str(tmp_path / f"audit{nproc}"),
            ],
        )
        assert trained.count("tuned lens for layers") == 1 and audited.count("audited 124 positions") == 1, nproc
    # Training: the 2-process gradients are two partial sums over <= 155 positions all-reduced, one sum in another
    # order: a relative difference <= n * 2^-24 ~ 9.2e-6 per coordinate (without cancellation). Adam's update is a
    # ratio of the gradients' moments (at most doubling that per step), so over 3 steps <= 6 * 9.2e-6 = 5.5e-5 < the
    # rtol 1e-4; atol 1e-6 (= 1e-4 x lr) for coordinates whose gradient sums cancel to within that rounding.
    one, two = (load_tuned_lens(tmp_path / f"lens{n}") for n in (1, 2))
    for a, b in zip(one.translators.parameters(), two.translators.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Auditing: each rank audits whole blocks through the same lens and the rows are gathered in block order, so the
    # statistics are those of one process bit for bit (no tolerance). Audits through the two lenses would not be: the
    # gap fit and the percentiles count margins below thresholds, and a rounding-sized change of one margin can move
    # it across one (a step of 1/124 in a fraction), which no rounding bound covers.
    layers = [json.loads((tmp_path / f"audit{n}" / "layers.json").read_text()) for n in (1, 2)]
    assert layers[0]["lens"] == "tuned" and len(layers[0]["layers"]) == 3
    assert layers[0] == layers[1]
    summaries = [json.loads((tmp_path / f"audit{n}" / "audit.json").read_text()) for n in (1, 2)]
    assert {k: v for k, v in summaries[0].items() if k != "provenance"} == {
        k: v for k, v in summaries[1].items() if k != "provenance"
    }
    # The lens skipped 4 blocks of 32 (tokens 0-127): at --block_size 16, 120 positions read tokens 0-127, 121 0-129.
    from hf_mrp.research import cli

    audit16 = ["audit", "--model", str(tiny_model_dir), "--block_size", "16", "--lens", "tuned"]
    audit16 += ["--lens_path", str(tmp_path / "lens1"), "--output_dir", str(tmp_path / "audit16")]
    assert cli.main([*audit16, "--max_positions", "121"]) == 2
    assert "reads tokens 0-129 of" in capsys.readouterr().err and not (tmp_path / "audit16" / "audit.json").exists()
    assert cli.main([*audit16, "--max_positions", "120", "--overwrite_output_dir", "true"]) == 0


def test_layer_sets_are_named_as_a_span_only_when_consecutive():
    assert (layer_spans([3, 4, 5]), layer_spans([10, 20, 27]), layer_spans([7])) == ("3-5", "[10, 20, 27]", "7")
