"""Text sources -> documents: the embedded pydoc corpus, a `datasets` dataset, or a local .txt / .jsonl /
.json / .parquet / .csv file.

Reading is lazy: a .txt file is decoded piece by piece (TextPieces) and a table's text column batch by batch,
so nothing past what the tokenizer consumes is read.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import MRPUserError

LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
EMBEDDED_CORPUS = "pydoc_data.topics"
PIECE_BYTES = 1 << 20  # a .txt file is read and tokenized in pieces of about 1 MiB, each ending at a line break
ENCODING_ERRORS = ("strict", "replace", "ignore")


def embedded_corpus_documents() -> list[str]:
    """The pydoc topic texts that ship with CPython (~113K SmolLM2 tokens), in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


class TextPieces:
    """One document read lazily from a text file, as consecutive pieces (no separator between them).

    Pieces end at a line break (at a space for a line longer than a piece), about PIECE_BYTES each,
    so reading and tokenizing stop once ``max_positions`` are covered; where a piece ends depends on
    the file only, so the same file gives the same blocks for every ``max_positions``.
    """

    def __init__(self, path: Path, encoding: str = "utf-8", errors: str = "strict"):
        self.path, self.encoding, self.errors = path, encoding, errors

    def __iter__(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder(self.encoding)(self.errors)
        consumed, pending = 0, ""
        with open(self.path, "rb") as handle:
            while True:
                chunk = handle.read(PIECE_BYTES)
                buffered = len(decoder.getstate()[0])
                try:
                    text = pending + decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as error:
                    raise self._decode_error(consumed - buffered + error.start, error) from None
                consumed += len(chunk)
                if not chunk:
                    if text:
                        yield text
                    return
                cut = text.rfind("\n") + 1 or text.rfind(" ") + 1
                piece, pending = (text[:cut], text[cut:]) if cut else ("", text)
                if piece:
                    yield piece

    def _decode_error(self, offset: int, error: UnicodeDecodeError) -> MRPUserError:
        bad = error.object[error.start : error.start + 1].hex()
        return MRPUserError(
            f"cannot read {self.path} as {self.encoding}: invalid byte 0x{bad} at byte offset {offset} "
            f"({error.reason}); "
            f"pass --encoding with the file's encoding (e.g. latin-1), or --encoding_errors replace to substitute "
            f"undecodable bytes (ignore drops them)"
        )


def check_encoding(encoding: str, errors: str) -> None:
    """A known codec and one of ENCODING_ERRORS, checked before anything is read."""
    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError):
        raise MRPUserError(
            f"unknown encoding {encoding!r}; pass a Python codec name such as utf-8 or latin-1"
        ) from None
    if errors not in ENCODING_ERRORS:
        raise MRPUserError(f"encoding_errors must be one of {', '.join(ENCODING_ERRORS)}, got {errors!r}")


def load_documents(
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    encoding: str = "utf-8",
    encoding_errors: str = "strict",
) -> tuple[Iterable, str]:
    """(documents, description) for a dataset name / local file / folder, or the embedded corpus.

    Nothing is read beyond what the tokenizer consumes: a .txt file streams as TextPieces, a table
    yields its text column in batches."""
    if dataset is not None and not isinstance(dataset, (str, Path)):
        raise MRPUserError(
            f"dataset must be a datasets name or a file/folder path (str), got {type(dataset).__name__}; "
            "for texts already in memory use hf_mrp.data.make_blocks(tokenizer, texts, ...)"
        )
    check_encoding(encoding, encoding_errors)
    check_flags_apply(dataset, dataset_config, split, text_column, encoding, encoding_errors)
    if dataset is None:
        return embedded_corpus_documents(), EMBEDDED_CORPUS
    dataset = str(dataset)
    path = Path(dataset)
    if path.suffix.lower() == ".txt" and path.is_file():
        return [TextPieces(path, encoding, encoding_errors)], str(path)
    if path.suffix.lower() in LOCAL_FORMATS and not path.exists():
        raise MRPUserError(f"data file not found: {dataset}; pass an existing file or a datasets name")
    table = _load_dataset(dataset, dataset_config, split, path)
    if text_column not in table.column_names:
        raise MRPUserError(
            f"text column {text_column!r} not found in {dataset} (columns: {', '.join(table.column_names)}); "
            f"pass --text_column with one of them"
        )
    return _column_texts(table, text_column), dataset


def check_data_flags_apply(data_args) -> None:
    """`check_flags_apply` for the ``--dataset`` flags (DataArguments): what commands check before loading a model."""
    check_flags_apply(
        data_args.dataset,
        data_args.dataset_config,
        data_args.split,
        data_args.text_column,
        data_args.encoding,
        data_args.encoding_errors,
    )


def check_flags_apply(
    dataset, dataset_config: str | None, split: str, text_column: str, encoding: str, encoding_errors: str
) -> None:
    """Refuse a data flag that cannot apply to the chosen input (it would be silently ignored): --text_column,
    --split and --dataset_config for a .txt file or the embedded corpus, --encoding / --encoding_errors for anything
    but a .txt file, --split and --dataset_config for a local table file."""
    path = Path(str(dataset)) if dataset is not None else None
    text_file = path is not None and path.suffix.lower() == ".txt"
    local_file = path is not None and path.suffix.lower() in LOCAL_FORMATS
    source = (
        "the embedded corpus (no --dataset)"
        if path is None
        else f"the .txt file {dataset}"
        if text_file
        else f"the data file {dataset}"
        if local_file
        else None
    )
    given = {
        "--dataset_config": dataset_config is not None,
        "--split": split != "train",
        "--text_column": text_column != "text",
        "--encoding": codecs.lookup(encoding).name != "utf-8",
        "--encoding_errors": encoding_errors != "strict",
    }
    applies = {
        "--dataset_config": not local_file and path is not None,
        "--split": not local_file and path is not None,
        "--text_column": path is not None and not text_file,
        "--encoding": text_file,
        "--encoding_errors": text_file,
    }
    wrong = [flag for flag in given if given[flag] and not applies[flag]]
    if not wrong:
        return
    if wrong[0] in ("--encoding", "--encoding_errors"):
        what = f"{source or f'the dataset {dataset}'}, which datasets reads itself" if path is not None else source
        raise MRPUserError(f"{wrong[0]} applies to .txt files only, not to {what}; drop it")
    why = (
        "it has one text and no columns, splits or configurations"
        if path is None or text_file
        else "a local file is one split ('train') with no configurations"
    )
    raise MRPUserError(f"{wrong[0]} cannot apply to {source}: {why}; drop it, or pass a --dataset it applies to")


def _column_texts(table, column: str, batch: int = 256) -> Iterator[str]:
    """The non-empty texts of one column, read batch by batch (never the whole column at once)."""
    for rows in table.select_columns([column]).iter(batch_size=batch):
        yield from (text for text in rows[column] if text)


def _folder_problem(folder: Path) -> str | None:
    """Why `datasets` cannot load a folder of data files, in words (None: it may)."""
    files = [p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts)]
    formats = sorted({p.suffix.lower() for p in files if p.suffix.lower() in LOCAL_FORMATS | {".arrow": ""}})
    if not formats:
        shown = ", ".join(sorted({p.suffix or p.name for p in files})[:6]) or "nothing"
        return f"it holds no data files (.txt/.jsonl/.json/.parquet/.csv), only {shown}"
    if len(formats) > 1 and not (folder / "dataset_info.json").is_file():
        counts = ", ".join(f"{sum(p.suffix.lower() == s for p in files)} {s}" for s in formats)
        return f"it mixes data formats ({counts}) and a folder must hold one format"
    return None


def _table_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in LOCAL_FORMATS
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def _first_bad_json_line(path: Path) -> str | None:
    """'line N of FILE is not valid JSON (...)' for the first line of a JSON-lines file that does not parse."""
    import json

    if path.suffix.lower() == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
            return None  # one JSON document, not JSON lines
        except (ValueError, UnicodeDecodeError):
            pass
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                return (
                    f"line {number} of {path} is not valid JSON ({error.msg} at character {error.pos + 1}); "
                    f"fix or remove that line"
                )
            if not isinstance(row, dict):
                return f"line {number} of {path} is a JSON {type(row).__name__}, not an object of columns; fix it"
    return None


def _columns_of(path: Path) -> tuple[str, ...] | None:
    """The column names of a table file, from its first row (JSON lines), header (csv) or schema (parquet)."""
    import csv
    import json

    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8", errors="replace") as handle:
                line = next((line for line in handle if line.strip()), None)
            row = json.loads(line) if line else None
            return tuple(sorted(row)) if isinstance(row, dict) else None
        if suffix == ".csv":
            with open(path, encoding="utf-8", errors="replace", newline="") as handle:
                return tuple(sorted(next(csv.reader(handle), [])))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return tuple(sorted(pq.read_schema(path).names))
    except (OSError, ValueError, StopIteration):
        return None
    return None


def _table_files_problem(path: Path) -> str | None:
    """What datasets' opaque failure ("An error occurred while generating the dataset") was, in words: the first
    line of a JSON-lines file that does not parse, or files of one folder with different columns (None: neither)."""
    tables = _table_files(path)
    for file in tables:
        if file.suffix.lower() in (".jsonl", ".json"):
            bad = _first_bad_json_line(file)
            if bad:
                return bad
    columns = {file: _columns_of(file) for file in tables}
    distinct = {cols for cols in columns.values() if cols is not None}
    if len(distinct) > 1:
        shown = "; ".join(
            f"{file.relative_to(path)}: {', '.join(cols)}"
            for file, cols in list(columns.items())[:6]
            if cols is not None
        )
        return (
            f"its files have different columns ({shown}); the files of one folder must share their columns: "
            f"split them into folders, or pass one file"
        )
    return None


def _load_dataset(dataset: str, dataset_config: str | None, split: str, path: Path):
    import datasets

    try:
        if path.is_file():
            builder = LOCAL_FORMATS.get(path.suffix.lower())
            if builder is None:
                raise MRPUserError(
                    f"unsupported data file {dataset}; use one of {', '.join(LOCAL_FORMATS)} or a datasets name"
                )
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            saved = datasets.load_from_disk(str(path))  # a folder written by Dataset.save_to_disk
            return saved[split] if isinstance(saved, datasets.DatasetDict) else saved
        problem = _folder_problem(path) if path.is_dir() else None
        if problem:
            raise MRPUserError(
                f"cannot use the folder {dataset} as a dataset: {problem}; pass one data file, "
                f"or a folder of files of one format"
            )
        return datasets.load_dataset(dataset, dataset_config, split=split)
    except MRPUserError:
        raise
    except Exception as error:  # datasets raises many types for "cannot find / cannot reach"
        problem = _table_files_problem(path) if path.exists() else None
        if problem:
            raise MRPUserError(f"cannot load {dataset}: {problem}") from error
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise MRPUserError(
            f"could not load dataset {dataset!r} ({type(error).__name__}: {first_line}); "
            "pass a local .txt/.jsonl/.parquet file, a dataset folder, or a name reachable from this machine"
        ) from error
