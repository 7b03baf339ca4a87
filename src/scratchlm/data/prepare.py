"""Corpus -> train/validation split by whole documents -> tokenizer -> token arrays.

The split is by document (for Shakespeare: by work), so no validation text is ever seen in training,
and deterministic: documents are ordered by a hash of their file name and taken into validation until
it holds `val_fraction` of the bytes. The tokenizer is trained on the training split only.

Output directory: `tokenizer/`, `train.bin` + `train.json`, `val.bin` + `val.json`, `split.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from scratchlm.atomic import atomic_directory, atomic_write_text, check_directory_target
from scratchlm.data.encode import encode_files
from scratchlm.errors import ScratchLMError
from scratchlm.tokenizer import Tokenizer, train_bpe

EOT = "<|endoftext|>"


def split_documents(paths: list[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, validation) by whole documents; validation holds at least `val_fraction` of the bytes
    (and at least one document), train at least one document."""
    if len(paths) < 2:
        raise ScratchLMError(
            f"need at least two documents to split by document, got {len(paths)}: "
            "give a folder of text files (one document per file)"
        )
    sizes = {p: p.stat().st_size for p in paths}
    order = sorted(paths, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    target = val_fraction * sum(sizes.values())
    val: list[Path] = []
    for path in order[:-1]:
        if sum(sizes[p] for p in val) >= target and val:
            break
        val.append(path)
    train = [p for p in paths if p not in val]
    return sorted(train), sorted(val)


PREPARED_FILES = ("tokenizer", "train.bin", "train.json", "val.bin", "val.json", "split.json")  # what prepare writes


def prepare(
    paths: list[Path],
    out_dir: str | os.PathLike,
    vocab_size: int,
    val_fraction: float = 0.05,
    workers=None,
    extra: dict | None = None,
) -> dict:
    """Split, train the tokenizer on the training documents, encode both splits. Returns split info
    (also written to `split.json`, with `extra` added). The directory is written as a unit: a crash
    leaves the previous one (or none), never a tokenizer beside arrays encoded with another."""
    if not 0 < val_fraction < 1:
        raise ScratchLMError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    train_paths, val_paths = split_documents(paths, val_fraction)
    check_directory_target(out_dir, PREPARED_FILES)
    vocab, merges = train_bpe(train_paths, vocab_size, [EOT], workers=workers, progress=True)
    tokenizer = Tokenizer(vocab, merges, [EOT])
    with atomic_directory(out_dir, PREPARED_FILES) as out:
        tokenizer.save(out / "tokenizer")
        train_meta = encode_files(tokenizer, train_paths, out / "train.bin", workers=workers)
        val_meta = encode_files(tokenizer, val_paths, out / "val.bin", workers=workers)
        info = {
            "tokenizer": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "train": {
                "documents": [p.name for p in train_paths],
                "bytes": train_meta["bytes"],
                "tokens": train_meta["tokens"],
            },
            "val": {
                "documents": [p.name for p in val_paths],
                "bytes": val_meta["bytes"],
                "tokens": val_meta["tokens"],
            },
            **(extra or {}),
        }
        atomic_write_text(out / "split.json", json.dumps(info, indent=1) + "\n")
    return info
