"""The hot loops of pre-tokenization, with an optional C implementation.

`scratchlm.tokenizer._pretok` (built from `_pretok.c` at install time) scans text with the GPT-2
pattern hand-compiled into a small state machine. Its character classes come from a table built
here with the `regex` module, so the C path and the regex reference agree on every code point
(tested on all reference corpora). Without a C compiler everything still works through `regex`.
"""

from __future__ import annotations

import contextlib
import sys
from array import array
from collections import Counter
from collections.abc import Callable
from functools import cache, partial
from itertools import pairwise
from pathlib import Path

import regex

from scratchlm.atomic import atomic_write_bytes
from scratchlm.tokenizer.pretokenize import GPT2_REGEX

try:
    from scratchlm.tokenizer import _pretok
except ImportError:  # no compiled extension: the regex path is the reference anyway
    _pretok = None

HAVE_C = _pretok is not None
OTHER, LETTER, NUMBER, SPACE = 0, 1, 2, 3


@cache
def class_table() -> bytes:
    """For every code point: 1 letter (\\p{L}), 2 number (\\p{N}), 3 whitespace (\\s), 0 other.

    Built with the `regex` module (0.1 s) and cached on disk per `regex` version (1 ms to read).
    """
    path = _table_cache_path()
    try:
        table = path.read_bytes()
        if len(table) == sys.maxunicode + 1:
            return table
    except OSError:
        pass
    table = _build_class_table()
    with contextlib.suppress(OSError):  # a read-only cache only costs the rebuild next time
        atomic_write_bytes(path, table)
    return table


def _table_cache_path() -> Path:
    from scratchlm.data.sources import cache_dir

    return cache_dir() / f"gpt2-classes-regex-{regex.__version__}.bin"


def _build_class_table() -> bytes:
    # Every code point in one string, built without 1.1 million temporary str objects.
    every_char = array("I", range(sys.maxunicode + 1)).tobytes().decode("utf-32-le", "surrogatepass")
    table = bytearray(sys.maxunicode + 1)
    for pattern, value in ((r"\p{L}+", LETTER), (r"\p{N}+", NUMBER), (r"\s+", SPACE)):
        for match in regex.finditer(pattern, every_char):
            table[match.start() : match.end()] = bytes([value]) * (match.end() - match.start())
    return bytes(table)


def split_reference(text: str) -> list[str]:
    """GPT-2 pre-tokens by the `regex` module: the definition the C scanner is tested against."""
    return GPT2_REGEX.findall(text)


def count_pretokens_reference(text: str, counts: Counter[str]) -> None:
    counts.update(GPT2_REGEX.findall(text))


def encode_pieces_reference(text: str, piece_ids: dict[str, list[int]], out: list[int]) -> None:
    for piece in GPT2_REGEX.findall(text):
        out.extend(piece_ids[piece])


def bpe_function_reference(
    ranks: dict[tuple[int, int], tuple[int, int]], byte_ids: list[int]
) -> Callable[[str], list[int]]:
    return partial(bpe_reference, ranks, byte_ids)


def bpe_reference(ranks: dict[tuple[int, int], tuple[int, int]], byte_ids: list[int | None], piece: str) -> list[int]:
    """BPE of one pre-token: start from its UTF-8 bytes, repeatedly merge (everywhere) the adjacent
    pair whose merge was learned earliest, until no adjacent pair has a merge. Bytes whose id is None
    (not in the vocabulary) are left out first, as `tokenizers` leaves them out."""
    ids = [i for b in piece.encode("utf-8") if (i := byte_ids[b]) is not None]
    while len(ids) > 1:
        best = min(pairwise(ids), key=lambda pair: ranks.get(pair, (1 << 62,))[0])
        if best not in ranks:
            break
        ids = merge_pair(ids, best, ranks[best][1])
    return ids


def merge_pair(ids: list[int], pair: tuple[int, int], merged: int) -> list[int]:
    """`ids` with every non-overlapping occurrence of `pair`, left to right, replaced by `merged`."""
    a, b = pair
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(merged)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _c_split(text: str) -> list[str]:
    return _pretok.split(text, class_table())


def _c_count_pretokens(text: str, counts: Counter[str]) -> None:
    _pretok.count(text, class_table(), counts)


def _c_encode_pieces(text: str, piece_ids: dict[str, list[int]], out: list[int]) -> None:
    _pretok.encode(text, class_table(), piece_ids, out)


def _c_bpe_function(ranks: dict[tuple[int, int], tuple[int, int]], byte_ids: list[int]) -> Callable[[str], list[int]]:
    table = [(a, b, merged) for (a, b), (_, merged) in sorted(ranks.items(), key=lambda kv: kv[1][0])]
    return partial(_pretok.bpe, _pretok.merger(table, byte_ids))


# The implementations the rest of scratchlm calls:
#   split(text) -> pre-tokens;  count_pretokens(text, counts): counts[p] += 1 per pre-token;
#   encode_pieces(text, piece_ids, out): out.extend(piece_ids[p]) per pre-token (a miss calls __missing__);
#   bpe_function(ranks, byte_ids) -> a function giving the token ids of one pre-token.
if HAVE_C:
    split, count_pretokens, encode_pieces, bpe_function = (
        _c_split,
        _c_count_pretokens,
        _c_encode_pieces,
        _c_bpe_function,
    )
else:
    split, count_pretokens = split_reference, count_pretokens_reference
    encode_pieces, bpe_function = encode_pieces_reference, bpe_function_reference
