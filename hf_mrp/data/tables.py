"""Tables of texts: a local .jsonl / .json / .parquet / .csv file, a folder of them, a folder written by
`Dataset.save_to_disk`, or a `datasets` name, loaded with `datasets`; when it fails, the reason in words (the
first JSON line that does not parse, files of one folder with different columns, a folder of mixed formats)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..errors import MRPUserError

# local data file suffix -> the `datasets` builder that reads it (.txt files are streamed as sources.TextPieces)
LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def column_texts(table, column: str, batch: int = 256) -> Iterator[str]:
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


def _check_utf8(path: Path) -> None:
    """Refuse a text table (JSON lines, JSON, csv) that is not UTF-8, naming the line: `datasets` loads its bytes
    unchecked and the texts fail to decode only later, mid-tokenization, as a traceback."""
    with open(path, "rb") as handle:
        offset = 0
        for number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise MRPUserError(
                    f"cannot read {path} as utf-8: invalid byte 0x{line[error.start : error.start + 1].hex()} on "
                    f"line {number} (byte offset {offset + error.start}); a {path.suffix} file must be UTF-8: "
                    f"re-encode it (e.g. iconv -f latin-1 -t utf-8) or fix that line (--encoding / --encoding_errors "
                    f"decode .txt files only)"
                ) from None
            offset += len(line)


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


def load_table(dataset: str, dataset_config: str | None, split: str, path: Path):
    import datasets

    for file in _table_files(path) if path.exists() else []:
        if file.suffix.lower() in (".jsonl", ".json", ".csv"):
            _check_utf8(file)
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
