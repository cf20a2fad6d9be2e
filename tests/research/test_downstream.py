"""`hf-mrp downstream` offline: local lm-eval tasks (tests/fixtures/downstream_tasks), a tiny base model, and
LoRA adapters with nonzero and zero lora_B, so we can see that the adapter is really applied."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from hf_mrp import models
from hf_mrp.research import cli, downstream

TASK_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "downstream_tasks"
TOY_TASKS = ["mrp_toy_choice", "mrp_toy_cloze"]
VOCAB = 49152  # the SmolLM2 tokenizer's vocabulary
REAL_TASK_MANAGER = downstream.task_manager
FIND_SPEC = importlib.util.find_spec
needs_lm_eval = pytest.mark.skipif(FIND_SPEC("lm_eval") is None, reason='needs lm-eval: pip install "hf_mrp[eval]"')


# ---------------------------------------------------------------- pure: the metric rule and result rows


# Tolerances: every pytest.approx here compares float64 arithmetic on the same numbers in another order (deltas and
# means of a few float64 scores): within n 2^-53 of them (n < 100: 1e-14); pytest.approx's default (rel 1e-6) is nowhere
# near that limit on any machine.


@pytest.mark.parametrize(
    "metrics, expected",
    [
        ({"acc": 0.4, "acc_norm": 0.5, "mc1": 0.2, "mc2": 0.3}, "acc_norm"),
        ({"mc1": 0.2, "acc": 0.4, "mc2": 0.3}, "acc"),
        ({"mc1": 0.2, "mc2": 0.3}, "mc2"),
        ({"mc1": 0.2, "perplexity": 12.0}, "mc1"),
        ({"perplexity": 12.0, "exact_match": 0.1}, None),
        ({"acc_norm": None, "acc": 0.0}, "acc"),  # a missing value does not win; a zero score does
    ],
)
def test_metric_rule_is_acc_norm_then_acc_then_mc2_then_mc1(metrics, expected):
    assert downstream.select_metric(metrics) == expected


def test_result_rows_become_metrics_stderrs_and_deltas():
    base = {
        "alias": "piqa",
        "acc,none": 0.70,
        "acc_stderr,none": 0.01,
        "acc_norm,none": 0.72,
        "acc_norm_stderr,none": "N/A",
        "exact_match,strict-match": 0.5,
    }
    tuned = {"alias": "piqa", "acc,none": 0.69, "acc_norm,none": 0.75, "exact_match,strict-match": 0.5}
    assert downstream.metric_values(base) == {"acc": 0.70, "acc_norm": 0.72, "exact_match,strict-match": 0.5}
    assert downstream.stderr_values(base) == {"acc": 0.01}
    row = downstream.task_row(base, tuned)
    assert row["metric"] == "acc_norm" and row["delta"] == pytest.approx(0.03) and row["base_stderr"] is None
    only_ppl = downstream.task_row({"perplexity,none": 9.0}, {"perplexity,none": 8.0})
    mean = downstream.mean_row({"piqa": row, "ppl": only_ppl})
    assert only_ppl["delta"] is None and mean["n_tasks"] == 1 and mean["delta"] == pytest.approx(0.03)
    names = downstream.parse_task_names(["piqa,hellaswag", "piqa", " winogrande "])
    assert names == ["piqa", "hellaswag", "winogrande"]


# ---------------------------------------------------------------- fixtures: offline, tiny model, adapters


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No Hub access, as on this machine: env for subprocesses, and the constants already read at import."""
    import datasets.config
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def manager():
    """Indexing lm-eval's ~15k task YAMLs takes ~5 s, so the tests build the index once."""
    return downstream.task_manager(str(TASK_DIR))


@pytest.fixture
def cached_index(monkeypatch, manager):
    """Hand every run in a test the module's index (a superset of what any of them asks for)."""

    def cached(include_path, include_defaults=True):
        assert include_path in (None, str(TASK_DIR))
        return manager

    monkeypatch.setattr(downstream.tasks, "task_manager", cached)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.embedded_model_dir())


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    from helpers import tiny_llama

    folder = tmp_path_factory.mktemp("base")
    tiny_llama(vocab=VOCAB).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_adapter(folder: Path, lora_b_scale: float) -> Path:
    """A LoRA adapter on q/v of the tiny model; lora_b_scale 0 is PEFT's identity initialisation."""
    from peft import LoraConfig, get_peft_model

    from helpers import tiny_llama

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(vocab=VOCAB), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(lora_b_scale * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return save_adapter(tmp_path_factory.mktemp("adapter"), lora_b_scale=1.0)


@pytest.fixture(scope="module")
def identity_adapter_dir(tmp_path_factory):
    return save_adapter(tmp_path_factory.mktemp("identity"), lora_b_scale=0.0)


# ---------------------------------------------------------------- the adapter is applied, and only then


@needs_lm_eval
@pytest.mark.integration  # the embedded model's tokenizer
def test_adapter_changes_loglikelihoods_and_an_identity_adapter_changes_nothing(
    manager, tokenizer, adapter_dir, identity_adapter_dir
):
    from helpers import tiny_llama

    model = tiny_llama(vocab=VOCAB)
    ids = torch.arange(5, 17)[None]
    with torch.no_grad():
        logits_before = model(input_ids=ids).logits
    task_set = downstream.TaskSet(TOY_TASKS, manager, downstream.load_tasks(manager, TOY_TASKS))

    report = downstream.compare_downstream(model, tokenizer, adapter_dir, task_set, batch_size=4)
    cloze = report["tasks"]["mrp_toy_cloze"]["metrics"]
    assert cloze["base"]["perplexity"] != pytest.approx(cloze["adapter"]["perplexity"], rel=1e-3)
    assert report["tasks"]["mrp_toy_choice"]["metric"] == "acc_norm"
    assert report["tasks"]["mrp_toy_cloze"]["metric"] == "acc"  # perplexity is never the headline

    control = downstream.compare_downstream(model, tokenizer, identity_adapter_dir, task_set, batch_size=4)
    # same weights (an adapter whose B is 0 adds exact zeros), the same batches: the same computation; rel 1e-6
    # leaves room only for lm-eval's float64 aggregation in another order (n 2^-53 for n items)
    for name, row in control["tasks"].items():  # same weights, same numbers: the runs do not leak into each other
        assert row["metrics"]["adapter"] == pytest.approx(row["metrics"]["base"], rel=1e-6), name
        assert row["metrics"]["base"] == pytest.approx(report["tasks"][name]["metrics"]["base"], rel=1e-6), name
    assert control["mean"]["delta"] == 0.0

    with torch.no_grad():  # the adapter was unloaded: the caller's model is as it was
        assert torch.equal(model(input_ids=ids).logits, logits_before)
    assert not any("lora" in name for name, _ in model.named_modules())


@needs_lm_eval
@pytest.mark.integration  # the embedded model's tokenizer
def test_cli_writes_json_markdown_and_one_summary_line(
    base_dir, adapter_dir, cached_index, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # data_files in the YAMLs are relative: read next to the YAML, not from here
    code = cli.main(
        [
            "downstream",
            "--model",
            str(base_dir),
            "--adapter",
            str(adapter_dir),
            "--tasks",
            *TOY_TASKS,
            "--include_path",
            str(TASK_DIR),
            "--limit",
            "4",
            "--batch_size",
            "4",
            "--device",
            "cpu",
            "--output_dir",
            "out",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((tmp_path / "out" / "downstream.json").read_text())
    assert list(report["tasks"]) == TOY_TASKS and report["mean"]["n_tasks"] == 2
    assert all(row["n_samples"] == 4 for row in report["tasks"].values())
    mean = report["mean"]
    assert mean["delta"] == pytest.approx(mean["adapter"] - mean["base"])
    assert report["provenance"]["model"] == str(base_dir) and report["provenance"]["versions"]["lm_eval"]
    assert report["provenance"]["arguments"]["limit"] == 4
    table = (tmp_path / "out" / "downstream.md").read_text()
    assert "| mrp\\_toy\\_choice | acc\\_norm |" in table and "**mean (2 tasks)**" in table
    assert captured.out.count("\n") == 1  # lm-eval's own prints go to stderr: stdout is the summary line
    assert captured.out.startswith("mean delta ") and "mrp_toy_cloze" in captured.out
    assert captured.out.strip().endswith(str(Path("out") / "downstream.json"))


# ---------------------------------------------------------------- user errors: one line that names the fix


@needs_lm_eval
@pytest.mark.parametrize(
    "case, message",
    [
        ("no_adapter", "adapter folder not found"),
        ("not_an_adapter", "has no adapter_config.json"),
        ("wrong_base", "could not apply adapter"),
        ("no_lm_eval", 'pip install "hf_mrp[eval]"'),
        ("unknown_task", "unknown task 'mrp_toy_choise' (did you mean 'mrp_toy_choice'"),
        ("hub_task", "this machine cannot reach the Hub; use --include_path with local data files"),
        ("no_include_path", "include_path folder not found"),
        ("zero_limit", "limit must be a positive number"),
    ],
)
@pytest.mark.integration  # the embedded model's tokenizer
def test_user_errors_are_one_line(case, message, base_dir, adapter_dir, cached_index, tmp_path, monkeypatch, capsys):
    args = {"adapter": str(adapter_dir), "tasks": "mrp_toy_choice", "include_path": str(TASK_DIR)}
    if case == "no_adapter":
        args["adapter"] = str(tmp_path / "missing")
    elif case == "not_an_adapter":
        args["adapter"] = str(base_dir)
    elif case == "wrong_base":  # an adapter for modules this base does not have
        wrong = tmp_path / "wrong"
        shutil.copytree(adapter_dir, wrong)
        config = json.loads((wrong / "adapter_config.json").read_text())
        (wrong / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["no_such_proj"]}))
        args["adapter"] = str(wrong)
    elif case == "no_lm_eval":
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a, **k: None if name == "lm_eval" else FIND_SPEC(name, *a, **k)
        )
    elif case == "unknown_task":
        args["tasks"] = "mrp_toy_choise"
    elif case == "hub_task":  # empty caches too, so a machine that once downloaded ARC still takes this path
        import datasets.config
        import huggingface_hub.constants

        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
        args["tasks"], args["include_path"] = "arc_challenge", None
    elif case == "no_include_path":
        monkeypatch.setattr(downstream.tasks, "task_manager", REAL_TASK_MANAGER)  # it checks the folder before indexing
        args["include_path"] = str(tmp_path / "no_tasks")
    argv = ["downstream", "--model", str(base_dir), "--output_dir", str(tmp_path / "out")]
    argv += [token for key, value in args.items() if value is not None for token in (f"--{key}", value)]
    if case == "zero_limit":
        argv += ["--limit", "0"]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("hf-mrp downstream: error:") and message in last and "Traceback" not in err
    assert not (tmp_path / "out" / "downstream.json").exists()
