"""Text -> deterministic token blocks: where text comes from (sources.py; tables of texts: tables.py) and how it
becomes blocks (blocks.py)."""

from .blocks import (
    DOCUMENT_SEPARATOR,
    Blocks,
    check_block_fits,
    context_window,
    labeled_blocks,
    load_blocks,
    make_blocks,
    tokenize_documents,
    tokenizer_identity,
)
from .sources import (
    EMBEDDED_CORPUS,
    PIECE_BYTES,
    TextPieces,
    check_encoding,
    embedded_corpus_documents,
    load_documents,
)
from .tables import LOCAL_FORMATS

__all__ = [
    "DOCUMENT_SEPARATOR",
    "EMBEDDED_CORPUS",
    "LOCAL_FORMATS",
    "PIECE_BYTES",
    "Blocks",
    "TextPieces",
    "check_block_fits",
    "check_encoding",
    "context_window",
    "embedded_corpus_documents",
    "labeled_blocks",
    "load_blocks",
    "load_documents",
    "make_blocks",
    "tokenize_documents",
    "tokenizer_identity",
]
