"""The before/after flip audit against a plain-Python recomputation from two synthetic position tables."""

import json
import statistics
from collections import Counter

import numpy as np
import pytest

from hf_mrp.audit.compare import compare_audits, compare_dirs, decoder_from_tokenizer, write_comparison
from hf_mrp.audit.geometry import AuditResult, summarize_positions, write_audit
from hf_mrp.audit.summary import AuditSummary
from hf_mrp.data import Blocks
from hf_mrp.errors import MRPUserError
from hf_mrp.stats.token_classes import BUCKETS, CLASSES, frequency_bucket, token_class

# Tolerances: every pytest.approx here compares float64 arithmetic on the same numbers in another order (means of
# counts, medians and means of float32 margins read as float64): within n 2^-53 of them (n <= 236 positions: 3e-14);
# pytest.approx's default (rel 1e-6) is nowhere near that limit on any machine.
TEXTS = {
    0: " ,",
    1: " =",
    2: " the",
    3: " Paris",
    4: " NASA",
    5: " 1984",
    6: " running",
    7: "ing",
    8: " of",
    9: " café",
}
VOCAB = 40
RARE = 38
TOP = 30  # long enough that ties in net reach the lists


def decode(token_id: int) -> str:
    return TEXTS.get(token_id, f" word{'abcdefghijklmnopqrstuvwxyz'[token_id % 26]}")  # " worda": content


def make_blocks(seed: int = 0) -> Blocks:
    """4 blocks of 60 tokens: " the" frequent (100+), " ," common (20-99), ids 30-39 rare: every bucket fills."""
    rng = np.random.default_rng(seed)
    weights = np.ones(VOCAB)
    weights[2], weights[0], weights[3:9], weights[30:] = 110.0, 25.0, 4.0, 0.08
    ids = rng.choice(VOCAB, size=(4, 60), p=weights / weights.sum()).astype(np.int64)
    ids[ids == RARE] = 39
    ids[0, 0], ids[1, 5] = RARE, RARE  # twice in the blocks, once as a target (a block's first token is none)
    return Blocks(ids, n_positions=4 * 59 - 5, source="synthetic")


def evaluated_targets(blocks: Blocks) -> tuple[list[int], list[int], list[int]]:
    """(block, position, target) of every evaluated position, by the definition (flat index < n_positions)."""
    rows = [], [], []
    n_blocks, size = blocks.input_ids.shape
    for block in range(n_blocks):
        for position in range(size - 1):
            if block * (size - 1) + position < blocks.n_positions:
                rows[0].append(block)
                rows[1].append(position)
                rows[2].append(int(blocks.input_ids[block, position + 1]))
    return rows


def make_audit(blocks: Blocks, seed: int, base: dict | None = None) -> AuditResult:
    """A position table with random predictions; with ``base``, top-1/top-2 partly kept from it."""
    block, position, target = (np.asarray(column, dtype=np.int64) for column in evaluated_targets(blocks))
    rng = np.random.default_rng(seed)
    n = target.size
    top1 = np.where(rng.random(n) < 0.5, target, rng.integers(0, VOCAB, n))
    top2 = (top1 + rng.integers(1, VOCAB, n)) % VOCAB
    if base is not None:
        keep1, keep2 = rng.random(n) < 0.6, rng.random(n) < 0.5
        top1 = np.where(keep1, base["top1_id"], top1)
        top2 = np.where(keep2 & (base["top2_id"] != top1), base["top2_id"], (top1 + rng.integers(1, VOCAB, n)) % VOCAB)
    margin = rng.exponential(1.5, n).astype(np.float32)
    margin[:8] = np.float32([0.1, 0.49, 0.5, 0.99, 1.0, 1.99, 2.0, 5.0])  # every band edge, both sides
    positions = {
        "block": block,
        "position": position,
        "target_id": target,
        "top1_id": top1,
        "top2_id": top2,
        "margin": margin,
        "correct": top1 == target,
        "entropy": rng.random(n).astype(np.float32),
        "p_top1": rng.uniform(0.02, 0.98, n).astype(np.float32),
        "target_logprob": -rng.exponential(1.0, n).astype(np.float32),
        "target_margin": rng.normal(size=n),
        "geometric_margin": rng.random(n).astype(np.float32),
        "brier": rng.uniform(0, 2, n).astype(np.float32),
    }
    summary = AuditSummary(provenance={"data_source": blocks.source}, **summarize_positions(positions))
    return AuditResult(summary, positions, blocks)


@pytest.fixture(scope="module")
def pair() -> tuple[AuditResult, AuditResult]:
    blocks = make_blocks()
    before = make_audit(blocks, seed=1)
    after = make_audit(blocks, seed=2, base=before.positions)
    return before, after


@pytest.fixture(scope="module")
def result(pair) -> dict:
    return compare_audits(*pair, decode=decode, top_tokens=TOP)


def columns(audit: AuditResult) -> dict[str, list]:
    return {name: values.tolist() for name, values in audit.positions.items()}


# ---- token classes and buckets ------------------------------------------------------------------


def test_frequency_buckets():
    counts = [1, 2, 4, 5, 19, 20, 99, 100, 5000]
    assert frequency_bucket(counts).tolist() == ["1", "2-4", "2-4", "5-19", "5-19", "20-99", "20-99", "100+", "100+"]
    with pytest.raises(ValueError):
        frequency_bucket([0])


# ---- every number against a loop-by-loop recomputation ------------------------------------------


def test_flips_churn_rotation(pair, result):
    b, a = (columns(audit) for audit in pair)
    n = len(b["target_id"])
    w2r = sum(1 for i in range(n) if not b["correct"][i] and a["correct"][i])
    r2w = sum(1 for i in range(n) if b["correct"][i] and not a["correct"][i])
    assert w2r > 0 and r2w > 0
    assert (result["w2r"], result["r2w"], result["net"], result["n_positions"]) == (w2r, r2w, w2r - r2w, n)
    assert result["flip_ratio"] == pytest.approx(w2r / r2w)
    assert result["churn"] == pytest.approx(sum(b["top1_id"][i] != a["top1_id"][i] for i in range(n)) / n)
    rotated = [i for i in range(n) if b["top1_id"][i] == a["top1_id"][i] and b["top2_id"][i] != a["top2_id"][i]]
    assert 0 < len(rotated) < n
    assert result["runner_up_rotation"]["share"] == pytest.approx(len(rotated) / n)
    widened = sum(1 for i in rotated if a["margin"][i] > b["margin"][i])
    assert result["runner_up_rotation"]["widened_share"] == pytest.approx(widened / len(rotated))
    changes = [float(a["margin"][i]) - float(b["margin"][i]) for i in rotated]
    assert result["runner_up_rotation"]["mean_margin_change"] == pytest.approx(sum(changes) / len(changes))
    assert result["runner_up_rotation"]["median_margin_change"] == pytest.approx(statistics.median(changes))
    assert result["accuracy_before"] == pytest.approx(sum(b["correct"]) / n)
    assert result["accuracy_after"] == pytest.approx(sum(a["correct"]) / n)


def test_margins_and_bands(pair, result):
    b, a = (columns(audit) for audit in pair)
    mb, ma = b["margin"], a["margin"]
    assert result["median_margin_before"] == pytest.approx(statistics.median(mb))
    assert result["median_margin_after"] == pytest.approx(statistics.median(ma))
    assert result["median_margin_change"] == pytest.approx(statistics.median(ma) / statistics.median(mb) - 1)
    change = [y - x for x, y in zip(mb, ma)]
    expansion = result["expansion"]
    assert expansion["share_wider"] == pytest.approx(sum(c > 0 for c in change) / len(change))
    assert expansion["mean_change"] == pytest.approx(sum(change) / len(change))
    assert expansion["median_change"] == pytest.approx(statistics.median(change))
    bands = {"<0.5": (0, 0.5), "0.5-1": (0.5, 1), "1-2": (1, 2), "2-5": (2, 5), ">=5": (5, float("inf"))}
    assert list(result["accuracy_by_margin_band"]) == list(bands)
    for label, (lo, hi) in bands.items():
        members = [i for i, m in enumerate(mb) if lo <= m < hi]
        row = result["accuracy_by_margin_band"][label]
        assert row["n"] == len(members) > 0, label
        assert row["accuracy_before"] == pytest.approx(sum(b["correct"][i] for i in members) / len(members))
        assert row["accuracy_after"] == pytest.approx(sum(a["correct"][i] for i in members) / len(members))
    assert sum(row["n"] for row in result["accuracy_by_margin_band"].values()) == len(mb)
    own = result["accuracy_by_own_margin_band"]  # the paper's convention: each model by its own margin
    assert list(own) == list(bands)
    for label, (lo, hi) in bands.items():
        for side, margins, correct in (("before", mb, b["correct"]), ("after", ma, a["correct"])):
            members = [i for i, m in enumerate(margins) if lo <= m < hi]
            assert own[label][f"n_{side}"] == len(members) > 0, (label, side)
            assert own[label][f"accuracy_{side}"] == pytest.approx(sum(correct[i] for i in members) / len(members))
    assert any(own[label]["n_before"] != own[label]["n_after"] for label in bands)  # the rows move


def expected_groups(b: dict, a: dict, key) -> dict:
    """{group: [n, w2r, r2w, correct before, correct after]} with ``key(target_id)`` naming the group."""
    groups: dict = {}
    for i, target in enumerate(b["target_id"]):
        row = groups.setdefault(key(target), [0, 0, 0, 0, 0])
        row[0] += 1
        row[1] += (not b["correct"][i]) and a["correct"][i]
        row[2] += b["correct"][i] and not a["correct"][i]
        row[3] += b["correct"][i]
        row[4] += a["correct"][i]
    return groups


def check_group(actual: dict, expected: list | None) -> None:
    if expected is None:
        assert actual["n"] == 0 and actual["accuracy_before"] is None and actual["accuracy_after"] is None
        return
    n, w2r, r2w, right_before, right_after = expected
    assert (actual["n"], actual["w2r"], actual["r2w"], actual["net"]) == (n, w2r, r2w, w2r - r2w)
    assert actual["accuracy_before"] == pytest.approx(right_before / n)
    assert actual["accuracy_after"] == pytest.approx(right_after / n)


def test_frequency_buckets_and_head_share(pair, result):
    b, a = (columns(audit) for audit in pair)
    counts = Counter(pair[0].blocks.input_ids.ravel().tolist())  # all tokens of the blocks, not only targets

    def bucket(token: int) -> str:
        c = counts[token]
        return "1" if c == 1 else "2-4" if c <= 4 else "5-19" if c <= 19 else "20-99" if c <= 99 else "100+"

    expected = expected_groups(b, a, bucket)
    assert set(expected) == set(BUCKETS)  # the fixture reaches every bucket
    assert b["target_id"].count(RARE) == 1 and bucket(RARE) == "2-4"  # counted among all tokens, not targets
    assert list(result["by_bucket"]) == list(BUCKETS)
    for label in BUCKETS:
        check_group(result["by_bucket"][label], expected.get(label))
    head = expected["100+"][1] - expected["100+"][2]
    assert result["head_share"] == pytest.approx(head / result["net"])


def test_token_classes_of_targets(pair, result):
    b, a = (columns(audit) for audit in pair)
    expected = expected_groups(b, a, lambda token: token_class(decode(token)))
    assert {"structural", "function", "entity", "numeric", "content", "other"} == set(expected)
    net = result["net"]
    assert list(result["by_class"]) == list(CLASSES)
    for label in CLASSES:
        check_group(result["by_class"][label], expected[label])
        group_net = expected[label][1] - expected[label][2]
        assert result["by_class"][label]["share_of_net"] == pytest.approx(group_net / net)
    assert sum(row["share_of_net"] for row in result["by_class"].values()) == pytest.approx(1.0)


def test_top_tokens(pair, result):
    b, a = (columns(audit) for audit in pair)
    per_token = expected_groups(b, a, lambda token: token)
    net = {token: row[1] - row[2] for token, row in per_token.items()}
    gains = sorted((t for t in net if net[t] > 0), key=lambda t: (-net[t], -per_token[t][1], t))[:TOP]
    losses = sorted((t for t in net if net[t] < 0), key=lambda t: (net[t], -per_token[t][2], t))[:TOP]
    assert [row["token_id"] for row in result["top_gain"]] == gains
    assert [row["token_id"] for row in result["top_loss"]] == losses
    for row in result["top_gain"] + result["top_loss"]:
        token = row["token_id"]
        assert row["token"] == decode(token)
        assert (row["w2r"], row["r2w"], row["net"]) == (per_token[token][1], per_token[token][2], net[token])


def hand_audit(blocks: Blocks, correct: list[bool]) -> AuditResult:
    """A table written out by hand: top-1 is the target where ``correct``, else token 0."""
    target = blocks.input_ids[0, 1:]
    n = target.size
    top1 = np.where(correct, target, 0)
    positions = {
        "block": np.zeros(n, dtype=np.int64),
        "position": np.arange(n),
        "target_id": target,
        "top1_id": top1,
        "top2_id": top1 + 1,
        "margin": np.linspace(0.1, 3.0, n),
        "correct": np.asarray(correct),
        "entropy": np.ones(n),
        "p_top1": np.full(n, 0.5),
        "target_logprob": -np.ones(n),
        "target_margin": np.zeros(n),
        "geometric_margin": np.ones(n),
        "brier": np.full(n, 0.5),
    }
    summary = AuditSummary(provenance={"data_source": blocks.source}, **summarize_positions(positions))
    return AuditResult(summary, positions, blocks)


def test_top_token_ties_by_flip_count():
    blocks = Blocks(np.array([[1, 6, 6, 6, 5, 7, 8, 8]]), n_positions=7, source="hand")
    #                targets:  6      6      6     5      7      8      8
    before = hand_audit(blocks, [False, False, True, False, False, True, True])
    after = hand_audit(blocks, [True, True, False, True, True, False, False])
    result = compare_audits(before, after)
    assert [(r["token_id"], r["w2r"], r["r2w"], r["net"]) for r in result["top_gain"]] == [
        (6, 2, 1, 1),
        (5, 1, 0, 1),
        (7, 1, 0, 1),
    ]  # equal net: more corrections first, then lower id
    assert [(r["token_id"], r["net"]) for r in result["top_loss"]] == [(8, -2)]
    assert (result["w2r"], result["r2w"], result["net"], result["flip_ratio"]) == (4, 3, 1, pytest.approx(4 / 3))
    assert result["by_bucket"]["2-4"]["net"] == -1 and result["by_bucket"]["1"]["net"] == 2


def reference_ece(confidence: list, correct: list, bins: int = 15) -> float:
    total = 0.0
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        members = [i for i, p in enumerate(confidence) if lo < p <= hi or (k == 0 and p == 0)]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            mean_confidence = sum(confidence[i] for i in members) / len(members)
            total += len(members) / len(confidence) * abs(accuracy - mean_confidence)
    return total


def test_calibration_and_gap_fits(pair, result):
    for name, audit in zip(("before", "after"), pair):
        c = columns(audit)
        assert result[f"ece_{name}"] == pytest.approx(reference_ece(c["p_top1"], c["correct"]), abs=1e-9)
        assert result[f"brier_{name}"] == pytest.approx(sum(c["brier"]) / len(c["brier"]), rel=1e-6)
        assert result[f"gap_fit_{name}"] == audit.summary.gap_fit.to_dict()
    assert result["ece_before"] != result["ece_after"]


def test_identical_audits_leave_ratios_undefined(pair):
    same = compare_audits(pair[0], pair[0], decode=decode)
    assert (same["w2r"], same["r2w"], same["net"], same["churn"]) == (0, 0, 0, 0.0)
    assert same["flip_ratio"] is None and same["head_share"] is None
    assert same["median_margin_change"] == 0.0 and same["expansion"]["share_wider"] == 0.0
    assert same["runner_up_rotation"] == {
        "share": 0.0,
        "widened_share": None,
        "mean_margin_change": None,
        "median_margin_change": None,
    }
    assert all(row["share_of_net"] is None for row in same["by_class"].values())
    assert same["top_gain"] == [] and same["top_loss"] == []


def test_no_decode_omits_classes(pair):
    plain = compare_audits(*pair)
    assert plain["by_class"] is None
    assert all(row["token"] is None for row in plain["top_gain"])


# ---- refusals -----------------------------------------------------------------------------------


def test_refuses_different_blocks(pair):
    before = pair[0]
    other = make_audit(make_blocks(seed=7), seed=2)
    with pytest.raises(MRPUserError, match="same blocks"):
        compare_audits(before, other)
    fewer = Blocks(before.blocks.input_ids, before.blocks.n_positions - 1, "synthetic")
    with pytest.raises(MRPUserError, match="n_positions"):
        compare_audits(before, AuditResult(before.summary, before.positions, fewer))
    order = np.arange(before.blocks.n_positions)[::-1]
    shuffled = {name: values[order] for name, values in before.positions.items()}
    with pytest.raises(MRPUserError, match="block columns of positions.parquet"):
        compare_audits(before, AuditResult(before.summary, shuffled, before.blocks))


# ---- files --------------------------------------------------------------------------------------


def test_write_comparison(pair, result, tmp_path):
    files = write_comparison(result, *pair, tmp_path)
    for name in (
        "flip_audit.json",
        "flip_audit.md",
        "margins_overlay.png",
        "gap_curves.png",
        "net_by_class.png",
        "net_by_bucket.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    assert set(files.values()) == {
        tmp_path / name
        for name in (
            "flip_audit.json",
            "flip_audit.md",
            "margins_overlay.png",
            "gap_curves.png",
            "net_by_class.png",
            "net_by_bucket.png",
        )
    }
    written = json.loads((tmp_path / "flip_audit.json").read_text())
    for key in (
        "w2r",
        "r2w",
        "net",
        "flip_ratio",
        "churn",
        "median_margin_change",
        "head_share",
        "by_class",
        "by_bucket",
        "ece_before",
        "ece_after",
        "brier_before",
        "brier_after",
    ):
        assert key in written, key
    assert written["w2r"] == result["w2r"] and written["flip_ratio"] == pytest.approx(result["flip_ratio"])
    assert written["by_class"]["structural"]["net"] == result["by_class"]["structural"]["net"]
    markdown = (tmp_path / "flip_audit.md").read_text()
    assert f"| {result['w2r']:,} | {result['r2w']:,} | {result['net']:,} |" in markdown
    assert "| structural |" in markdown and "| 100+ |" in markdown


class StubTokenizer:
    """decode like a SentencePiece tokenizer: the word-initial space is dropped, kept in the piece."""

    def decode(self, ids) -> str:
        return "".join(decode(i).lstrip() for i in ids)

    def convert_ids_to_tokens(self, token_id: int) -> str:
        text = decode(token_id)
        return "\u2581" + text[1:] if text.startswith(" ") else text


def test_decoder_restores_word_start():
    restored = decoder_from_tokenizer(StubTokenizer())
    assert restored(6) == " running" and token_class(restored(6)) == "content"
    assert restored(7) == "ing" and token_class(restored(7)) == "content"  # the paper: a word piece


def test_compare_dirs_round_trip(pair, result, tmp_path):
    for name, audit in zip(("before", "after"), pair):
        write_audit(audit, tmp_path / name)
    loaded = compare_dirs(tmp_path / "before", tmp_path / "after", tmp_path / "flips", StubTokenizer(), top_tokens=TOP)
    assert (tmp_path / "flips" / "flip_audit.json").is_file()
    for key in ("w2r", "r2w", "churn", "head_share", "ece_after", "brier_before", "median_margin_change"):
        assert loaded[key] == pytest.approx(result[key]), key
    assert {k: v["net"] for k, v in loaded["by_class"].items()} == {k: v["net"] for k, v in result["by_class"].items()}
