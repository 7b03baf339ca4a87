"""Gopher's quality rules (Rae et al. 2021, appendix A), each reported on its own.

Words are the text's whitespace-separated tokens; "symbol words" (no letter or digit: punctuation,
bullets, dashes) do not count toward the word count or the mean word length, as in datatrove's
`GopherQualityFilter`. The counts are regular-expression scans over the whole text, not a Python loop
over its words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_COUNTED_WORD = re.compile(r"\S*[^\W_]\S*")  # a token with a letter or digit
_ALPHABETIC_WORD = re.compile(r"\S*[^\W\d_]\S*")  # a token with a letter
_ELLIPSIS_LINE = re.compile(r"(?:\.\.\.|…)[^\S\n]*$", re.M)


@dataclass(frozen=True)
class GopherRules:
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_ellipsis_lines: float = 0.3  # share of lines ending in "..." or "…"
    min_alphabetic_words: float = 0.8  # share of words with at least one alphabetic character
    min_stop_words: int = 2  # distinct English stop words present (Gopher's; 0 turns the rule off)


STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])  # Gopher's list


def gopher_failures(text: str, rules: GopherRules = GopherRules()) -> list[str]:
    """The names of the rules `text` fails (empty when it passes)."""
    n_words = len(text.split())
    counted = _COUNTED_WORD.findall(text)
    failures = []
    if len(counted) < rules.min_words:
        failures.append("gopher_too_few_words")
    if len(counted) > rules.max_words:
        failures.append("gopher_too_many_words")
    mean = sum(map(len, counted)) / len(counted) if counted else 0.0
    if not rules.min_mean_word_length <= mean <= rules.max_mean_word_length:
        failures.append("gopher_mean_word_length")
    n_lines = len(text.splitlines())
    if n_lines and len(_ELLIPSIS_LINE.findall(text)) / n_lines > rules.max_ellipsis_lines:
        failures.append("gopher_ellipsis_lines")
    if not n_words or len(_ALPHABETIC_WORD.findall(text)) / n_words < rules.min_alphabetic_words:
        failures.append("gopher_alphabetic_words")
    if rules.min_stop_words and len(STOP_WORDS.intersection(text.split())) < rules.min_stop_words:
        failures.append("gopher_stop_words")
    return failures
