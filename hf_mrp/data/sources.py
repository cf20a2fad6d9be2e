"""Text sources -> documents: the embedded pydoc corpus, a `datasets` dataset, or a local .txt / .jsonl /
.json / .parquet / .csv file.

Reading is lazy: a .txt file is decoded piece by piece (TextPieces) and a table's text column batch by batch,
so nothing past what the tokenizer consumes is read. Tables (local files, folders, `datasets` names) are loaded,
and their failures explained, in `tables.py`.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import MRPUserError
from .tables import LOCAL_FORMATS, column_texts, load_table

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
    table = load_table(dataset, dataset_config, split, path)
    if text_column not in table.column_names:
        raise MRPUserError(
            f"text column {text_column!r} not found in {dataset} (columns: {', '.join(table.column_names)}); "
            f"pass --text_column with one of them"
        )
    return column_texts(table, text_column), dataset


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
