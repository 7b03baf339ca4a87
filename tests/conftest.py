"""Shared fixtures. Tests that need `../shared/data/` (GPT-2 files, corpora) skip without it."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ADVERSARIAL = [
    "",
    "hello world",
    "Hello, World! It's 2026; we've 3.14159 reasons… don't we'll?",
    "emoji 👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵 and 🤖🤖🤖",
    "中文字符和日本語のテキスト、한국어 텍스트",
    "combining: e\u0301 a\u0300\u0301 n\u0303 Z\u0351\u0352\u0353",
    "   leading spaces\n\n\n   and    runs     of      spaces\t\t tabs \r\n windows\r\n",
    "\n\n\n\n",
    "    ",
    "trailing whitespace   ",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|><|endoftext|>",
    "glued<|endoftext|>to<|endoftext|> words <|endoftext|>\n",
    "almost special <|endoftext| and <|endof text|> and <|endoftext|",
    "numbers 1234567890 ١٢٣ ⅻ ² and mixed a1b2c3",
    "'s 'S 'll 'LL 've 're 'd 'm 't ''' '",
    "\u00a0nbsp\u2028line sep\u3000ideographic space\u200bzero width",
    "\x00\x01\x7f control \ufeff BOM \ufffd",
]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "gpt2_vocab.json").is_file():
        pytest.skip(f"needs the reference files in {SHARED_DATA} (GPT-2 tokenizer, corpora)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gpt2(shared_data):
    from scratchlm.tokenizer.stats import load_gpt2

    return load_gpt2(shared_data)


def corpus_text(shared_data: Path, name: str) -> str:
    with gzip.open(shared_data / "corpora" / name, "rt", encoding="utf-8") as f:
        return f.read()


def synthetic_text(n_words: int = 20_000, seed: int = 0) -> str:
    """Deterministic text with words, punctuation, numbers, contractions, unicode and whitespace runs."""
    rng = random.Random(seed)
    words = ["the", "king", "queen", "lord", "love", "death", "night", "day", "sword", "crown", "Hamlet",
             "ROMEO", "thee", "thou", "doth", "naïve", "café", "日本", "über", "x", "42", "1999", "3.14"]  # fmt: skip
    seps = [
        " ",
        " ",
        " ",
        " ",
        ", ",
        ". ",
        "\n",
        "\n\n",
        "  ",
        "; ",
        "'s ",
        "'ll ",
        "! ",
        "?\n",
        "\t",
        " -- ",
    ]
    return "".join(rng.choice(words) + rng.choice(seps) for _ in range(n_words))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests never write into the user's ~/.cache/scratchlm (subprocesses inherit this too)."""
    import os

    os.environ["SCRATCHLM_CACHE"] = str(tmp_path_factory.mktemp("scratchlm-cache"))
