"""The hot loops of pre-tokenization, with an optional C implementation.

`scratchlm.tokenizer._pretok` (built from `_pretok.c` at install time) scans text with the GPT-2
pattern hand-compiled to a state machine over a code-point class table derived from the `regex`
module itself, so both paths split identically (tested). Without a C compiler everything still works
through `regex`, only slower.
"""

from __future__ import annotations

from collections import Counter

from scratchlm.tokenizer.pretokenize import GPT2_REGEX

try:
    from scratchlm.tokenizer import _pretok
except ImportError:  # no compiled extension: the pure-Python path below is the reference anyway
    _pretok = None

HAVE_C = _pretok is not None


def split(text: str) -> list[str]:
    """GPT-2 pre-tokens of `text` (which holds no special tokens)."""
    return GPT2_REGEX.findall(text)


def count_pretokens(text: str, counts: Counter[str]) -> None:
    """Add the pre-token counts of `text` to `counts`."""
    counts.update(GPT2_REGEX.findall(text))
