"""Documents -> deterministic blocks of token ids.

Documents are tokenized without special tokens, joined with a blank line and cut into consecutive blocks of
``block_size`` tokens. Position t of a block predicts token t + 1, so a block holds ``block_size - 1`` positions;
only the first ``max_positions`` positions (in block order) are evaluated, and nothing past them is tokenized.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np

from ..errors import MRPUserError, require_number
from ..ops.fused import IGNORE_INDEX
from .sources import TextPieces, load_documents

DOCUMENT_SEPARATOR = "\n\n"


@dataclass
class Blocks:
    """Token-id blocks [n_blocks, block_size] and how many of their positions are evaluated.

    By default the first ``n_positions`` positions in block order are evaluated; ``mask``
    [n_blocks, block_size - 1] names them instead (e.g. only the assistant turns of chats), and then
    ``n_positions`` must be its count.
    """

    input_ids: np.ndarray
    n_positions: int
    source: str
    tokenizer: str = ""  # the tokenizer's identity (tokenizer_identity); "" when unknown
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if isinstance(self.input_ids, (str, bytes)) or not hasattr(self.input_ids, "__len__"):
            raise MRPUserError(
                f"Blocks.input_ids must be a [n_blocks, block_size] array of token ids, "
                f"got {type(self.input_ids).__name__}; "
                "build blocks with hf_mrp.load_blocks(tokenizer, ...) or make_blocks"
            )
        ids = np.asarray(self.input_ids)
        if ids.ndim != 2 or ids.shape[1] < 2 or not np.issubdtype(ids.dtype, np.integer):
            raise MRPUserError(
                f"Blocks.input_ids must be a 2-D integer array with at least 2 tokens per block, got shape "
                f"{ids.shape} of {ids.dtype}; build blocks with hf_mrp.load_blocks(tokenizer, ...) or make_blocks"
            )
        capacity = ids.shape[0] * (ids.shape[1] - 1)
        if not _is_int(self.n_positions) or not 0 <= int(self.n_positions) <= capacity:
            raise MRPUserError(
                f"Blocks.n_positions must be an integer in [0, {capacity}] (blocks x (block_size - 1)), "
                f"got {self.n_positions!r}; the blocks and their position count do not belong together"
            )
        self.input_ids, self.n_positions = ids, int(self.n_positions)
        if self.mask is not None:
            mask = np.asarray(self.mask)
            shape = (ids.shape[0], ids.shape[1] - 1)
            if mask.shape != shape or mask.dtype != np.bool_ or int(mask.sum()) != self.n_positions:
                raise MRPUserError(
                    f"Blocks.mask must be a boolean [n_blocks, block_size - 1] = {list(shape)} "
                    f"array with n_positions ({self.n_positions}) True entries, got {mask.dtype} {list(mask.shape)} "
                    f"with {int(mask.sum()) if mask.dtype == np.bool_ else '?'}; build it from the labels (!= -100)"
                )
            self.mask = mask

    @property
    def block_size(self) -> int:
        return int(self.input_ids.shape[1])

    def position_mask(self) -> np.ndarray:
        """[n_blocks, block_size - 1] booleans: which (block, position) pairs are evaluated."""
        if self.mask is not None:
            return self.mask
        n_blocks, size = self.input_ids.shape
        flat_index = np.arange(n_blocks * (size - 1)).reshape(n_blocks, size - 1)
        return flat_index < self.n_positions

    def labels(self) -> np.ndarray:
        """Causal-LM labels: input ids, with -100 where a position is not evaluated (shifted by one)."""
        labels = self.input_ids.copy()
        labels[:, 1:][~self.position_mask()] = IGNORE_INDEX
        return labels

    def fingerprint(self) -> str:
        """sha256 of the block shape, the ids, the evaluated count, the tokenizer's identity and the mask (when
        set): equal fingerprints mean identical positions (2 x 32 and 1 x 64 blocks of the same ids differ)."""
        digest = hashlib.sha256(json.dumps([list(self.input_ids.shape), self.n_positions, self.tokenizer]).encode())
        digest.update(np.ascontiguousarray(self.input_ids, dtype=np.int64).tobytes())
        if self.mask is not None:
            digest.update(np.packbits(self.mask).tobytes())
        return digest.hexdigest()


def tokenizer_identity(tokenizer) -> str:
    """sha256 of the tokenizer's id -> token table (what the ids of a block mean); the class name for a
    tokenizer without one. Two tokenizers with the same table give the same identity wherever they load from."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(get_vocab):
        return f"class:{type(tokenizer).__qualname__}"
    table = sorted((int(index), str(token)) for token, index in get_vocab().items())
    return hashlib.sha256(json.dumps(table, ensure_ascii=False).encode()).hexdigest()


def _is_int(value) -> TypeGuard[int]:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def tokenize_documents(tokenizer, documents: Iterable, max_tokens: int) -> Iterator[int]:
    """Token ids of the documents joined by a blank line, without special tokens, up to ``max_tokens``.

    A document is a text, or TextPieces (a file read piece by piece; its pieces are tokenized one at
    a time, so a long file is only read as far as ``max_tokens`` needs)."""
    if not callable(tokenizer):
        raise MRPUserError(
            f"tokenizer must be a loaded tokenizer, got {type(tokenizer).__name__} {tokenizer!r:.60}; "
            "load it with transformers.AutoTokenizer.from_pretrained(name) or hf_mrp.load_model_and_tokenizer"
        )
    separator = tokenizer(DOCUMENT_SEPARATOR, add_special_tokens=False)["input_ids"]
    produced = 0
    for index, document in enumerate(documents):
        if not isinstance(document, (str, TextPieces)):
            raise MRPUserError(
                f"document {index} is {type(document).__name__}, not text; pass texts (str), or for a table the "
                "--text_column that holds them"
            )
        pieces = [document] if isinstance(document, str) else document
        for number, piece in enumerate(pieces):
            ids = (separator if index and not number else []) + tokenizer(piece, add_special_tokens=False)["input_ids"]
            for token in ids:
                yield token
                produced += 1
                if produced >= max_tokens:
                    return


def check_block_settings(block_size: int, max_positions: int) -> None:
    """The one check of a block size and a position count (DataArguments runs it at parse time, before any work)."""
    for name, value in (("block_size", block_size), ("max_positions", max_positions)):
        require_number(name, value, integer=True)
    if block_size < 2:
        raise MRPUserError(f"block_size must be at least 2 (one input and one target token), got {block_size}")
    if max_positions <= 0:
        raise MRPUserError(f"max_positions must be positive, got {max_positions}")


def make_blocks(
    tokenizer,
    documents: Iterable,
    block_size: int = 512,
    max_positions: int = 16384,
    source: str = "",
) -> Blocks:
    """Cut the token stream into consecutive blocks covering ``max_positions`` positions (fewer if the text ends)."""
    if isinstance(documents, (str, bytes)):
        raise MRPUserError("documents must be a list (or iterable) of texts, not one string; wrap it: [text]")
    check_block_settings(block_size, max_positions)
    n_blocks = -(-max_positions // (block_size - 1))
    ids = np.fromiter(tokenize_documents(tokenizer, documents, n_blocks * block_size), dtype=np.int64)
    n_full = ids.size // block_size
    if n_full == 0:
        raise MRPUserError(
            f"the dataset {source or ''} has {ids.size} tokens, fewer than one block of {block_size}; "
            "pass more text or a smaller --block_size"
        )
    blocks = ids[: n_full * block_size].reshape(n_full, block_size)
    return Blocks(blocks, min(max_positions, n_full * (block_size - 1)), source, tokenizer_identity(tokenizer))


def labeled_blocks(rows: list[list[int]], labels: list[list[int]], pad_id: int, source: str = "") -> Blocks:
    """Blocks of sequences of unequal length (e.g. tokenized chats) that evaluate exactly the positions whose next
    label is not -100 (e.g. the assistant turns), right-padded with ``pad_id`` (padding is never evaluated and,
    coming last, never attended to by an evaluated position)."""
    if len(rows) != len(labels) or not rows or any(len(r) != len(y) for r, y in zip(rows, labels)):
        raise MRPUserError(
            "labeled_blocks needs one label row (-100 = not evaluated) per non-empty row of token ids, "
            "each as long as its row"
        )
    width = max(2, max(len(row) for row in rows))
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    for index, (row, label) in enumerate(zip(rows, labels)):
        ids[index, : len(row)], targets[index, : len(label)] = row, label
    mask = targets[:, 1:] != IGNORE_INDEX
    return Blocks(ids, int(mask.sum()), source, mask=mask)


def load_blocks(
    tokenizer,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    block_size: int = 512,
    max_positions: int = 16384,
    encoding: str = "utf-8",
    encoding_errors: str = "strict",
) -> Blocks:
    """The one entry point from data arguments to blocks (text files: ``encoding`` / ``encoding_errors``)."""
    documents, description = load_documents(dataset, dataset_config, split, text_column, encoding, encoding_errors)
    return make_blocks(tokenizer, documents, block_size, max_positions, description)


def context_window(model) -> int | None:
    """Positions the model was built for (max_position_embeddings / n_positions / ...), None when unstated."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if _is_int(value) and value > 0:
            return int(value)
    return None


def check_block_fits(model, block_size: int) -> None:
    """Refuse blocks longer than the model's context window (past it positions are meaningless or fail)."""
    window = context_window(model)
    if window is not None and block_size > window:
        raise MRPUserError(
            f"block_size {block_size} exceeds the model's context window of {window} positions; "
            f"pass --block_size {window} or less"
        )
