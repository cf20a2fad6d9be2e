"""Token breakdowns of the before/after audit: token class and frequency bucket (spec, "Token breakdowns").

The classes are the paper's (``classify_token`` of scripts/analysis/token_class_flip_audit.py in
github.com/mellowmarshall/mrp-paper), rule for rule, so "share of net by class" compares the same
partition as the paper's. hf_mrp's short names map to the paper's: function = function_word,
entity = entity_like, content = content_word, other = fragment_other.

Pure Python and numpy: a class depends only on the decoded text, a bucket only on a count, so both
can be tested on hand-picked tokens without a tokenizer.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

import numpy as np

CLASSES = ("structural", "numeric", "function", "entity", "content", "other")
PAPER_CLASS_NAMES = dict(
    zip(CLASSES, ("structural", "numeric", "function_word", "entity_like", "content_word", "fragment_other"))
)
BUCKETS = ("1", "2-4", "5-19", "20-99", "100+")
BUCKET_LOWER_EDGES = (2, 5, 20, 100)  # a count c falls in bucket searchsorted(edges, c, side="right")
HEAD_BUCKET = "100+"  # the head share is net(targets in this bucket) / net

# \Z, not $: "$" also matches before a trailing newline. The text is stripped first, so both agree here.
NUMERIC = re.compile(r"[0-9][0-9,./:%+-]*\Z")
ASCII_WORD = re.compile(r"[A-Za-z]+\Z")
ENTITY = re.compile(r"[A-Z][A-Za-z]+\Z|[A-Z]{2,}\Z")  # capitalized word, or an acronym of 2+ capitals

# The paper's 118 function words, as listed there ("it's" included: it can never match, since only
# ASCII-letter tokens are looked up, but the list is kept whole).
FUNCTION_WORDS = frozenset(
    """
    a an the and or but if then than that this these those to of in on at by for from with without about
    over under through into onto off up down out as is are was were be been being am do does did doing
    have has had having can could will would shall should may might must not no nor so because while
    where when who whom whose which what why how it its it's he him his she her hers they them their
    theirs we us our ours you your yours i me my mine there here also more most some any each every all
    both either neither few many much such own same other
""".split()
)


def is_structural(text: str) -> bool:
    """Every character of the stripped text is Unicode punctuation (P*) or symbol (S*); empty counts too."""
    return all(unicodedata.category(char)[0] in "PS" for char in text.strip())


def token_class(decoded: str) -> str:
    """The paper's class of one decoded token, first matching rule on the stripped text:

    structural (empty, or all P*/S* characters) -> numeric (^[0-9][0-9,./:%+-]*$) -> for ASCII
    words only (^[A-Za-z]+$): function word (lower-cased, in FUNCTION_WORDS), else entity
    (^[A-Z][A-Za-z]+$ or ^[A-Z]{2,}$), else content -> other (fragment/other).

    So a lower-case piece without a leading space ("ing") is a content word, and a word with a
    non-ASCII letter (" café", "日本") is "other", as in the paper.
    """
    stripped = decoded.strip()
    if is_structural(stripped):
        return "structural"
    if NUMERIC.match(stripped):
        return "numeric"
    if ASCII_WORD.match(stripped):
        if stripped.lower() in FUNCTION_WORDS:
            return "function"
        return "entity" if ENTITY.match(stripped) else "content"
    return "other"


def frequency_bucket(counts: np.ndarray | int) -> np.ndarray:
    """Bucket labels ("1", "2-4", "5-19", "20-99", "100+") for token counts (each at least 1)."""
    counts = np.asarray(counts, dtype=np.int64)
    if np.any(counts < 1):
        raise ValueError("frequency buckets need counts >= 1: a target token occurs at least once in its blocks")
    index = np.searchsorted(np.asarray(BUCKET_LOWER_EDGES), counts, side="right")
    return np.asarray(BUCKETS, dtype=object)[index]


def target_counts(input_ids: np.ndarray, target: np.ndarray) -> np.ndarray:
    """How often each position's target occurs among all tokens of the blocks ``input_ids``."""
    target = np.asarray(target, dtype=np.int64)
    counts = np.bincount(np.asarray(input_ids, dtype=np.int64).ravel(), minlength=int(target.max()) + 1)
    return counts[target]


def target_buckets(input_ids: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The frequency bucket of each position's target, counted in the blocks ``input_ids``."""
    return frequency_bucket(target_counts(input_ids, target))


def target_class_codes(target: np.ndarray, decode: Callable[[int], str]) -> np.ndarray:
    """Index into CLASSES of each position's decoded target; each distinct id is decoded once."""
    ids, inverse = np.unique(np.asarray(target, dtype=np.int64), return_inverse=True)
    codes = np.asarray([CLASSES.index(token_class(decode(int(token)))) for token in ids], dtype=np.int64)
    return codes[inverse.reshape(-1)]
