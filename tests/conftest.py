"""Shared fixtures. Tests that need `../shared/data/` (GPT-2 files, corpora) skip without it."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels' tests run under Triton's interpreter. Triton reads TRITON_INTERPRET once,
# when something first imports it (torch.compile and torch.distributed can), so it is set before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from scratchlm.data.prepare import prepare
from scratchlm.train.config import TrainConfig, load_config

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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Six synthetic works, split by document and encoded with a 300-token BPE (for trainer tests)."""
    root = tmp_path_factory.mktemp("train")
    docs = root / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"work{i}.txt").write_text(synthetic_text(4000, seed=i), encoding="utf-8")
    prepare(sorted(docs.glob("*.txt")), root / "data", vocab_size=300, val_fraction=0.2, workers=1)
    return root / "data"


def tiny_config(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    """A TrainConfig for a 2-layer, 32-wide model on `data_dir` (the fixture), writing to out_dir."""
    sets = [f"data.train_tokens={json.dumps(str(data_dir / 'train.bin'))}",
            f"data.val_tokens={json.dumps(str(data_dir / 'val.bin'))}",
            f"data.tokenizer={json.dumps(str(data_dir / 'tokenizer'))}", f"out_dir={json.dumps(str(out_dir))}",
            "model.vocab_size=300", "model.context_length=32", "model.d_model=32", "model.n_layers=2",
            "model.n_heads=4", "batch_size=4", "max_steps=20", "eval_every=10", "eval_tokens=512",
            "log_every=5", "checkpoint_every=10", "optim.warmup_steps=3", "threads=1"]  # fmt: skip
    sets += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(None, sets)
