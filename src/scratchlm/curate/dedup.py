"""Exact deduplication: lines seen more than once anywhere in the corpus are removed everywhere, and
documents whose whole text was seen before are dropped (the first one in corpus order is kept).

Both work in two passes over files on disk, in bounded memory: each shard writes the sorted 64-bit
hashes of its lines (with counts) and of its documents; the global step merges them one hash range at a
time, reading only that range of each shard's sorted array.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable
from pathlib import Path

import numpy as np

RANGES = 16  # the global merge holds 1/RANGES of all hashes at a time


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def normalize_line(line: str) -> str:
    return " ".join(line.split())


def line_hashes(texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct hashes of the non-blank lines of `texts` (sorted, uint64) and how often each occurs."""
    hashes = np.fromiter(
        (hash64(n) for text in texts for line in text.splitlines() if (n := normalize_line(line))), dtype=np.uint64
    )
    return np.unique(hashes, return_counts=True)


def save_counts(path: Path, hashes: np.ndarray, counts: np.ndarray) -> None:
    np.save(path, np.stack([hashes, counts.astype(np.uint64)]))


def duplicated_hashes(paths: list[Path], ranges: int = RANGES) -> np.ndarray:
    """The hashes whose summed count over every shard file is more than one (sorted)."""
    arrays = [np.load(p, mmap_mode="r") for p in paths]
    edges = [2**64 * k // ranges for k in range(ranges + 1)]
    found = []
    for low, high in itertools.pairwise(edges):
        parts_h, parts_c = [], []
        for a in arrays:
            lo = np.searchsorted(a[0], np.uint64(low))
            hi = np.searchsorted(a[0], np.uint64(high)) if high < 2**64 else len(a[0])
            parts_h.append(np.asarray(a[0][lo:hi]))
            parts_c.append(np.asarray(a[1][lo:hi]))
        if not parts_h:
            continue
        h, c = np.concatenate(parts_h), np.concatenate(parts_c)
        unique, inverse = np.unique(h, return_inverse=True)
        totals = np.bincount(inverse, weights=c, minlength=len(unique))
        found.append(unique[totals > 1])
    return np.concatenate(found) if found else np.zeros(0, np.uint64)


def remove_lines(text: str, duplicated: np.ndarray) -> tuple[str, int]:
    """`text` without its duplicated lines (`duplicated`: sorted hashes; blank lines kept); how many went."""
    lines = text.splitlines()
    hashes = np.fromiter((hash64(n) if (n := normalize_line(line)) else 0 for line in lines), np.uint64, len(lines))
    where = np.minimum(np.searchsorted(duplicated, hashes), max(len(duplicated) - 1, 0))
    drop = (duplicated[where] == hashes) & (hashes != 0) if len(duplicated) else np.zeros(len(lines), bool)
    kept = [line for line, d in zip(lines, drop, strict=True) if not d]
    return "\n".join(kept).strip("\n"), int(drop.sum())


def first_occurrences(hashes: np.ndarray) -> np.ndarray:
    """A mask over documents in corpus order: True for the first document with each text hash."""
    _, first = np.unique(hashes, return_index=True)
    keep = np.zeros(len(hashes), dtype=bool)
    keep[first] = True
    return keep
