"""Gopher's quality rules (Rae et al. 2021, appendix A), each reported on its own.

Words are the text's whitespace-separated tokens; "symbol words" (no letter or digit: punctuation,
bullets, dashes) do not count toward the word count or the mean word length, as in datatrove's
`GopherQualityFilter`. Most words start or end with a letter, which `str` methods see at C speed; only
the rest are searched by a regular expression.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LETTER_OR_DIGIT = re.compile(r"[^\W_]")
_LETTER = re.compile(r"[^\W\d_]")
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
    words = text.split()
    symbols = [w for w in words if not (w[0].isalnum() or w[-1].isalnum()) and not _LETTER_OR_DIGIT.search(w)]
    n_counted = len(words) - len(symbols)
    failures = []
    if n_counted < rules.min_words:
        failures.append("gopher_too_few_words")
    if n_counted > rules.max_words:
        failures.append("gopher_too_many_words")
    mean = (sum(map(len, words)) - sum(map(len, symbols))) / n_counted if n_counted else 0.0
    if not rules.min_mean_word_length <= mean <= rules.max_mean_word_length:
        failures.append("gopher_mean_word_length")
    n_lines = len(text.splitlines())
    if n_lines and len(_ELLIPSIS_LINE.findall(text)) / n_lines > rules.max_ellipsis_lines:
        failures.append("gopher_ellipsis_lines")
    alphabetic = sum(1 for w in words if w[0].isalpha() or w[-1].isalpha() or _LETTER.search(w))
    if not words or alphabetic / len(words) < rules.min_alphabetic_words:
        failures.append("gopher_alphabetic_words")
    if rules.min_stop_words and len(STOP_WORDS.intersection(words)) < rules.min_stop_words:
        failures.append("gopher_stop_words")
    return failures
