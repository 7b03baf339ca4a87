"""The C pre-tokenizer and BPE loop against their pure-Python definitions (regex, bpe_reference)."""

import random
from collections import Counter

import pytest
from conftest import ADVERSARIAL, synthetic_text

from scratchlm.tokenizer import fast

pytestmark = pytest.mark.skipif(not fast.HAVE_C, reason="the C extension is not built (no compiler at install)")

# Characters that stress every branch: contractions, the optional space, each class, Unicode whitespace
# that \s does and does not cover, a lone surrogate, astral letters and numbers.
POOL = [
    *"'sdmtlvre  \t\n\r\x0b\x0c",
    "\u00a0", "\u2028", "\u3000", "\x1c", "\x85", "\u200b", "a", "Z", "é", "ß", "日", "𝔘", "1", "٣", "Ⅻ", "²",
    "𝟘", ".", ",", "!", "-", "\u0301", "😀", "\ud800", "_", "<", "|",
]  # fmt: skip


def test_split_matches_regex_on_random_unicode():
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choices(POOL, k=rng.randint(0, 40)))
        assert fast.split(text) == fast.split_reference(text), repr(text)


@pytest.mark.parametrize("text", [*ADVERSARIAL, synthetic_text(3000)])
def test_split_and_count_match_regex(text):
    assert fast.split(text) == fast.split_reference(text)
    counts = Counter()
    fast.count_pretokens(text, counts)
    assert counts == Counter(fast.split_reference(text))


def test_c_bpe_matches_reference():
    rng = random.Random(1)
    byte_ids = list(range(256))
    alphabet = ["a", "b", "é", " ", "x", "日"]
    symbols = sorted({b for ch in alphabet for b in ch.encode()})
    ranks = {}
    for rank in range(150):  # random merges over the pieces' bytes and earlier merges
        a, b = rng.choice(symbols), rng.choice(symbols)
        ranks.setdefault((a, b), (rank, 256 + rank))
        symbols.append(256 + rank)
    c_bpe = fast.bpe_function(ranks, byte_ids)
    merged = 0
    for _ in range(2000):
        piece = "".join(rng.choices(alphabet, k=rng.randint(1, 30)))
        ids = c_bpe(piece)
        assert ids == fast.bpe_reference(ranks, byte_ids, piece)
        merged += len(ids) < len(piece.encode())
    assert merged > 1000  # the merges really ran
    with pytest.raises(UnicodeEncodeError):
        c_bpe("a\ud800")


def test_pure_python_fallback_encodes_identically(monkeypatch):
    """What a machine without a C compiler runs: the regex path through a whole Tokenizer and trainer."""
    from scratchlm.tokenizer import Tokenizer
    from scratchlm.tokenizer.trainer import train_bpe_from_counts

    text = "".join(ADVERSARIAL) + synthetic_text(2000)
    counts_c, counts_py = Counter(), Counter()
    fast.count_pretokens(text, counts_c)
    fast.count_pretokens_reference(text, counts_py)
    assert counts_c == counts_py
    vocab, merges = train_bpe_from_counts(counts_c, 400, ["<|endoftext|>"])
    with_c = Tokenizer(vocab, merges, ["<|endoftext|>"]).encode(text)
    monkeypatch.setattr(fast, "encode_pieces", fast.encode_pieces_reference)
    monkeypatch.setattr(fast, "bpe_function", fast.bpe_function_reference)
    assert Tokenizer(vocab, merges, ["<|endoftext|>"]).encode(text) == with_c
