"""Baseline tokenizers — character, byte and word — to show the trade-off BPE answers.

Bytes: tiny vocabulary (256), nothing is ever unknown, but the longest sequences (1 byte per token).
Characters: a vocabulary of every character seen, still long sequences. Words (GPT-2 pre-tokens):
short sequences but a huge vocabulary, and unseen words become `<unk>`. BPE sits in between: a
vocabulary of a chosen size, no unknowns, and sequences several times shorter than bytes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from scratchlm.tokenizer import fast

UNK = "<unk>"


def compression_ratio(text: str, n_tokens: int) -> float:
    """UTF-8 bytes per token (higher = shorter sequences)."""
    return len(text.encode("utf-8")) / max(n_tokens, 1)


class ByteTokenizer:
    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class CharTokenizer:
    """One id per distinct character of the training text; id 0 is `<unk>`."""

    name = "char"

    def __init__(self, training_text: str) -> None:
        self.itos = [UNK, *sorted(set(training_text))]
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(ch, 0) for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in ids)


class WordTokenizer:
    """One id per GPT-2 pre-token seen at least `min_count` times in the training text; else `<unk>`."""

    name = "word"

    def __init__(self, training_text: str, min_count: int = 1) -> None:
        counts = Counter(fast.split(training_text))
        self.itos = [UNK, *sorted(w for w, c in counts.items() if c >= min_count)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, 0) for w in fast.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in ids)
