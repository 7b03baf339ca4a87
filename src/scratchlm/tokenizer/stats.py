"""Tokenizer statistics: vocabulary, compression ratio, longest tokens, and the same for baselines."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from scratchlm.tokenizer.bpe import Tokenizer
from scratchlm.tokenizer.simple import ByteTokenizer, CharTokenizer, WordTokenizer, compression_ratio

GPT2_FILES = ("gpt2_vocab.json", "gpt2_merges.txt")


@dataclass
class Row:
    name: str
    vocab_size: int
    tokens: int
    bytes_per_token: float
    note: str = ""


def find_gpt2_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The folder holding GPT-2's `gpt2_vocab.json` + `gpt2_merges.txt`: the argument,
    `$SCRATCHLM_GPT2_DIR`, or `../shared/data` beside the working directory; None if absent."""
    candidates = [explicit, os.environ.get("SCRATCHLM_GPT2_DIR"), Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and all((Path(candidate) / name).is_file() for name in GPT2_FILES):
            return Path(candidate)
    return None


def load_gpt2(directory: Path) -> Tokenizer:
    return Tokenizer.from_files(directory / GPT2_FILES[0], directory / GPT2_FILES[1], ["<|endoftext|>"])


def compare(tokenizer: Tokenizer, text: str, gpt2: Tokenizer | None = None, name: str = "bpe") -> list[Row]:
    """Compression of `tokenizer`, GPT-2 (if given) and the byte/char/word baselines on `text`."""
    rows = [Row(name, tokenizer.vocab_size, n := len(tokenizer.encode(text)), compression_ratio(text, n))]
    if gpt2 is not None:
        rows.append(Row("gpt2", gpt2.vocab_size, n := len(gpt2.encode(text)), compression_ratio(text, n)))
    for baseline in (ByteTokenizer(), CharTokenizer(text), WordTokenizer(text)):
        n = len(baseline.encode(text))
        note = "" if baseline.name == "byte" else "vocabulary fit on this same text"
        rows.append(Row(baseline.name, baseline.vocab_size, n, compression_ratio(text, n), note))
    return rows


def longest_tokens(tokenizer: Tokenizer, n: int = 10) -> list[tuple[int, bytes]]:
    ordinary = [(i, b) for i, b in tokenizer.vocab.items() if i not in tokenizer.special_ids.values()]
    return sorted(ordinary, key=lambda item: (-len(item[1]), item[0]))[:n]


def format_report(tokenizer: Tokenizer, rows: list[Row], text_name: str, text_bytes: int, top: int = 10) -> str:
    lines = [
        f"tokenizer {tokenizer.fingerprint}: vocabulary {tokenizer.vocab_size:,} "
        f"({len(tokenizer.merges):,} merges, special tokens: {', '.join(tokenizer.special_tokens) or 'none'})",
        f"compression on {text_name} ({text_bytes:,} bytes of UTF-8):",
        f"  {'tokenizer':<10} {'vocab':>9} {'tokens':>12} {'bytes/token':>12}",
    ]
    for row in rows:
        note = f"  ({row.note})" if row.note else ""
        lines.append(f"  {row.name:<10} {row.vocab_size:>9,} {row.tokens:>12,} {row.bytes_per_token:>12.3f}{note}")
    lines.append(f"longest tokens of {rows[0].name}:")
    for token_id, token in longest_tokens(tokenizer, top):
        lines.append(f"  {token_id:>6}  {len(token):>3} bytes  {token.decode('utf-8', 'replace')!r}")
    return "\n".join(lines)
