"""Pre-tokenization: special-token splitting, the GPT-2 regex, and safe places to cut a text.

BPE never merges across a pre-token boundary, so a text can be cut anywhere the pre-tokenizer
itself would start a new piece and each part encoded on its own: the result is identical. That
one fact gives us parallel training, parallel file encoding and lazy streaming encoding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import AnyStr

import regex

from scratchlm.errors import ScratchLMError

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_REGEX = regex.compile(GPT2_PATTERN)

# Zero-width positions where the GPT-2 pattern always starts a new piece, whatever follows:
#  * before a space that sits between two printable ASCII characters (the space opens the next piece);
#  * after a lone newline/tab/CR between two printable ASCII characters;
#  * before the last character of a whitespace run of two or more that is followed by a printable ASCII
#    character (mid-text `\s+(?!\S)` leaves that last character to the next piece; the left part,
#    now at the end of its text, is still matched whole).
# Cutting at the end of a whitespace run would be wrong: `a\n\n|b` gives `\n\n` on the left but
# `\n`, `\n` in the whole. Only ASCII is tested, so the same rule works on `str` and UTF-8 `bytes`
# and never cuts a multi-byte character.
_CUT_PATTERN = (
    r"(?<=[!-~])(?= [!-~])"
    r"|(?<=[!-~][\t\n\v\f\r])(?=[!-~])"
    r"|(?<=[\t\n\v\f\r ])(?=[\t\n\v\f\r ][!-~])"
)
_CUT_STR = regex.compile(_CUT_PATTERN, flags=regex.REVERSE)
_CUT_BYTES = regex.compile(_CUT_PATTERN.encode(), flags=regex.REVERSE)
CHUNK_BYTES = 1 << 22  # 4 MiB of text per parallel work item


class SpecialTokenSplitter:
    """Splits text on special tokens; the longest special token wins where several overlap.

    Works on `str` (for encoding) and on UTF-8 `bytes` (for cutting files into chunks).
    """

    def __init__(self, special_tokens: Sequence[str] = ()) -> None:
        self.special_tokens = sorted(set(special_tokens), key=lambda s: (-len(s), s))
        self.max_len_bytes = max((len(s.encode()) for s in self.special_tokens), default=0)
        if self.special_tokens:
            alternation = "|".join(regex.escape(s) for s in self.special_tokens)
            self._str = regex.compile(alternation)
            self._bytes = regex.compile(alternation.encode())
        else:
            self._str = self._bytes = None

    def split(self, text: str) -> Iterator[tuple[str, bool]]:
        """Yield `(segment, is_special)` in order; ordinary segments may be empty and are skipped."""
        if self._str is None:
            if text:
                yield text, False
            return
        start = 0
        for match in self._str.finditer(text):
            if match.start() > start:
                yield text[start : match.start()], False
            yield match.group(), True
            start = match.end()
        if start < len(text):
            yield text[start:], False

    def ordinary_segments(self, text: str) -> Iterator[str]:
        """The text between special tokens (what BPE training counts)."""
        for segment, is_special in self.split(text):
            if not is_special:
                yield segment

    def safe_cut(self, buffer: AnyStr) -> int:
        """The largest position `p` where `buffer[:p]` and the rest can be pre-tokenized apart.

        Returns 0 when no such position exists yet. A cut never falls inside a special token, never
        just before one that follows whitespace, and never within the last `max_len - 1` characters,
        where a special token may still be arriving.
        """
        is_bytes = isinstance(buffer, bytes)
        cut_re = _CUT_BYTES if is_bytes else _CUT_STR
        limit = max(len(buffer) - max(self.max_len_bytes - 1, 0), 0)
        specials = self._bytes if is_bytes else self._str
        if specials is None:
            match = cut_re.search(buffer, 0, limit)
            return match.start() if match else 0
        occurrences = [m.span() for m in specials.finditer(buffer)]
        # Just after a complete special token a new segment starts: always safe.
        last_special_end = max((end for _, end in occurrences if end <= limit), default=0)
        starts = {start for start, _ in occurrences}
        for match in cut_re.finditer(buffer, last_special_end, limit):  # from the end backwards
            cut = match.start()
            # A whitespace run that ends at a special token is one piece: do not split it.
            if cut + 1 in starts or any(start < cut < end for start, end in occurrences):
                continue
            return cut
        return last_special_end


def read_chunks(path: Path, splitter: SpecialTokenSplitter, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Yield the bytes of a file in pieces that can be pre-tokenized independently."""
    try:
        with open(path, "rb") as f:
            pending = b""
            while block := f.read(chunk_bytes):
                pending += block
                cut = splitter.safe_cut(pending)
                if cut:
                    yield pending[:cut]
                    pending = pending[cut:]
            if pending:
                yield pending
    except OSError as exc:
        raise ScratchLMError(f"cannot read {path}: {exc.strerror or exc}") from exc


def decode_utf8(data: bytes, path: Path, offset: int) -> str:
    """Decode strictly, saying where the input is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = offset + exc.start
        raise ScratchLMError(
            f"{path}: not valid UTF-8 at byte {where} ({data[exc.start : exc.start + 4]!r}); "
            "convert the file to UTF-8 first"
        ) from None
