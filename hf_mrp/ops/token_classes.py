"""Token breakdowns of the before/after audit: token class and frequency bucket (spec, "Token breakdowns").

Pure Python and numpy: a class depends only on the decoded text, a bucket only on a count, so both
can be tested on hand-picked tokens without a tokenizer.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

CLASSES = ("structural", "numeric", "function", "entity", "content", "other")
BUCKETS = ("1", "2-4", "5-19", "20-99", "100+")
BUCKET_LOWER_EDGES = (2, 5, 20, 100)  # a count c falls in bucket searchsorted(edges, c, side="right")

NUMERIC = re.compile(r"^[0-9][0-9,./:%+-]*$")
ENTITY = re.compile(r"^[A-Z][A-Za-z]+$|^[A-Z]{2,}$")

FUNCTION_WORDS = frozenset(
    # articles and determiners
    "a an the this that these those some any each every all both either neither no "
    # pronouns
    "i me my mine myself you your yours yourself we us our ours ourselves he him his himself "
    "she her hers herself it its itself they them their theirs themselves who whom whose which what "
    # auxiliaries and modals
    "be am is are was were been being have has had having do does did "
    "will would shall should can could may might must "
    # prepositions
    "of in on at by for with from to into onto about above below over under between among "
    "through during before after against without within upon across toward towards behind "
    "beyond near since until via per as "
    # conjunctions and negation
    "and or but nor so yet if because although though while whereas unless whether than then not".split()
)


def is_structural(text: str) -> bool:
    """Every character is Unicode punctuation (P*) or symbol (S*); the empty string counts too."""
    return all(unicodedata.category(char)[0] in "PS" for char in text)


def token_class(decoded: str) -> str:
    """The class of one decoded token: the first of the spec's rules that matches the stripped text.

    structural (empty, or all P*/S* characters) -> numeric -> function word (lower-cased, in
    FUNCTION_WORDS) -> entity (^[A-Z][A-Za-z]+$ or ^[A-Z]{2,}$) -> content (alphabetic) -> other.

    One refinement of the spec's "content word (other alphabetic); fragment/other": an alphabetic
    token that does not start with whitespace and is all lower-case ("ing" in "runn|ing") is a
    word continuation piece, so it is "other" (fragment), not "content". Byte-level BPE decodes a
    word-initial token with its leading space (" running"), which is what tells the two apart; a
    word at the very start of a line decodes without one and is counted as a fragment too.
    Caseless scripts (CJK) are never fragments: they do not separate words with spaces.
    """
    stripped = decoded.strip()
    if is_structural(stripped):
        return "structural"
    if NUMERIC.match(stripped):
        return "numeric"
    if stripped.lower() in FUNCTION_WORDS:
        return "function"
    if ENTITY.match(stripped):
        return "entity"
    if stripped.isalpha():
        starts_word = decoded[:1].isspace()
        return "other" if not starts_word and stripped.islower() else "content"
    return "other"


def frequency_bucket(counts: np.ndarray | int) -> np.ndarray:
    """Bucket labels ("1", "2-4", "5-19", "20-99", "100+") for token counts (each at least 1)."""
    counts = np.asarray(counts, dtype=np.int64)
    if np.any(counts < 1):
        raise ValueError("frequency buckets need counts >= 1: a target token occurs at least once in its blocks")
    index = np.searchsorted(np.asarray(BUCKET_LOWER_EDGES), counts, side="right")
    return np.asarray(BUCKETS, dtype=object)[index]
