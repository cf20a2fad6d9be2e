"""hf_mrp.stats.token_classes: the paper's token classes (mrp-paper, token_class_flip_audit.classify_token).

The expected class of each token is worked out by hand from the paper's rules, in order: structural
(stripped text empty or all Unicode P*/S*), numeric (^[0-9][0-9,./:%+-]*$), then for ASCII-letter
words only: function word (lower-cased, in the 118-word list), entity-like (^[A-Z][A-Za-z]+$ or
^[A-Z]{2,}$), content word; anything else is fragment/other.
"""

import pytest

from hf_mrp.stats.token_classes import CLASSES, FUNCTION_WORDS, PAPER_CLASS_NAMES, token_class

PAPER_TABLE = [
    # structural: empty after stripping, or every character punctuation/symbol
    (" ,", "structural"),
    ("\n", "structural"),
    ("\n\n", "structural"),
    ("", "structural"),
    (" ", "structural"),
    (" ...", "structural"),
    ("=", "structural"),
    (" (", "structural"),
    ("$", "structural"),
    (" —", "structural"),
    ("»", "structural"),
    (" +=", "structural"),
    ("'", "structural"),
    # numeric
    (" 1984", "numeric"),
    ("3.14", "numeric"),
    ("10%", "numeric"),
    (" 1-2", "numeric"),
    ("0", "numeric"),
    ("12:30", "numeric"),
    ("1,000", "numeric"),
    # function words: the paper's list, any case, with or without a leading space
    (" up", "function"),
    (" between", "content"),
    (" the", "function"),
    ("The", "function"),
    (" I", "function"),
    (" and", "function"),
    (" doing", "function"),
    (" other", "function"),
    (" same", "function"),
    (" THE", "function"),
    ("Also", "function"),
    (" there", "function"),
    # words the old hf_mrp list had but the paper's does not: content words
    (" among", "content"),
    (" via", "content"),
    (" since", "content"),
    (" itself", "content"),
    # entity-like: capitalized ASCII words and acronyms of 2+ capitals
    (" Paris", "entity"),
    (" NASA", "entity"),
    ("Ing", "entity"),
    (" GPU", "entity"),
    (" McDonald", "entity"),
    # content words: other ASCII-letter words, word-initial or not, any length
    ("ing", "content"),
    ("tion", "content"),
    (" running", "content"),
    (" B", "content"),
    ("x", "content"),
    (" iPhone", "content"),
    # fragment/other: non-ASCII letters, mixed letters and digits or punctuation
    (" café", "other"),
    (" école", "other"),
    ("日本", "other"),
    (" x2", "other"),
    ("'s", "other"),
    (" e.g", "other"),
    (" it's", "other"),
    (" Zürich", "other"),
    ("1st", "other"),
    (" -ing", "other"),
    (" 1.5x", "other"),
    (" ÉCOLE", "other"),
    # classes the paper's own output gives these targets (results/run11_fisher_0.6/token_class_flip_audit.json)
    ("s", "content"),
    ("ed", "content"),
    ("awi", "content"),
    (" since", "content"),
    (" against", "content"),
    (" E", "content"),
    (" km", "content"),
]


def test_the_table_is_long_enough_and_covers_every_class():
    assert len(PAPER_TABLE) >= 40
    assert {expected for _, expected in PAPER_TABLE} == set(CLASSES)


@pytest.mark.parametrize("text, expected", PAPER_TABLE)
def test_token_class_follows_the_papers_rules(text, expected):
    assert token_class(text) == expected


def test_function_word_list_is_the_papers():
    assert len(FUNCTION_WORDS) == 118
    assert {
        "up",
        "down",
        "out",
        "off",
        "doing",
        "where",
        "when",
        "why",
        "how",
        "there",
        "here",
        "also",
        "more",
        "most",
        "few",
        "many",
        "much",
        "such",
        "own",
        "same",
        "other",
        "it's",
    } <= FUNCTION_WORDS
    assert not {"between", "among", "via", "since", "until", "itself", "whether", "although"} & FUNCTION_WORDS
    assert all(word == word.lower() for word in FUNCTION_WORDS)


def test_paper_class_names():
    assert PAPER_CLASS_NAMES == {
        "structural": "structural",
        "numeric": "numeric",
        "function": "function_word",
        "entity": "entity_like",
        "content": "content_word",
        "other": "fragment_other",
    }
