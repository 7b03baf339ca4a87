"""Fuzzy deduplication: MinHash signatures over word n-grams, LSH bands, candidate pairs verified by
their true Jaccard similarity, clusters by union-find; one document kept per cluster.

Each word is hashed once (CRC-32), a shingle's hash folds its n word hashes, and each of the `num_perm`
permutations is a multiply-shift hash `(a * x + b) mod 2^64 >> 32` of it, minimised over the shingles.
The C extension `_minhash` (built at install) does it in one pass per document; the numpy path gives the
same bits where it is not built.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence

import numpy as np

try:
    from scratchlm.curate import _minhash
except ImportError:  # no compiler at install time: the numpy path
    _minhash = None

_WORD = re.compile(rb"[0-9A-Za-z_\x80-\xff]+")
_MIX = np.uint64(0x9E3779B97F4A7C15)
_BLOCK = 4096  # shingles per block when taking the minima


def words(text: str) -> list[bytes]:
    """Runs of ASCII letters, digits and '_' and non-ASCII characters, in UTF-8, ASCII lower-cased:
    punctuation, case and spacing do not make documents differ."""
    return _WORD.findall(text.encode("utf-8").lower())


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    """One uint64 per word n-gram (documents shorter than n words have one shingle: all their words)."""
    if _minhash is not None:
        return np.frombuffer(_minhash.shingle_hashes(text.encode("utf-8"), n), dtype=np.uint64)
    w = words(text)
    if not w:
        return np.zeros(0, np.uint64)
    h = np.fromiter((zlib.crc32(x) for x in w), dtype=np.uint64, count=len(w))
    if len(h) < n:
        n = len(h)
    with np.errstate(over="ignore"):
        out = np.zeros(len(h) - n + 1, np.uint64)
        for j in range(n):
            out = out * _MIX + h[j : len(h) - n + 1 + j]
        return out ^ (out >> np.uint64(29))


class MinHasher:
    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self.a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint32: the minimum of each permutation over the document's shingles."""
        if _minhash is not None:
            return np.frombuffer(_minhash.signature(text.encode("utf-8"), self.a, self.b, self.ngram), np.uint32)
        return self.signature_of_hashes(shingle_hashes(text, self.ngram))

    def signature_of_hashes(self, shingles: np.ndarray) -> np.ndarray:
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, np.uint32)
        with np.errstate(over="ignore"):
            for start in range(0, len(shingles), _BLOCK):
                x = shingles[start : start + _BLOCK, None]
                values = ((self.a * x + self.b) >> np.uint64(32)).astype(np.uint32)
                np.minimum(sig, values.min(axis=0), out=sig)
        return sig

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32."""
        return np.stack([self.signature(t) for t in texts]) if texts else np.zeros((0, self.num_perm), np.uint32)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The true Jaccard similarity of two shingle-hash sets."""
    a, b = np.unique(a), np.unique(b)
    union = len(np.union1d(a, b))
    return len(np.intersect1d(a, b, assume_unique=True)) / union if union else 1.0


def band_keys(signatures: np.ndarray, bands: int) -> np.ndarray:
    """(n_docs, bands) uint64: one hash per band of rows (num_perm must divide into the bands)."""
    n, num_perm = signatures.shape
    if num_perm % bands:
        raise ValueError(f"num_perm {num_perm} is not a multiple of bands {bands}")
    rows = signatures.reshape(n, bands, num_perm // bands).astype(np.uint64)
    keys = np.zeros((n, bands), np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows.shape[2]):
            keys = (keys ^ rows[:, :, r]) * _MIX
    return keys


def candidate_groups(keys: np.ndarray) -> list[np.ndarray]:
    """For each band, the documents (indices, ascending) that share that band's key, 2 or more each."""
    groups = []
    for band in range(keys.shape[1]):
        column = keys[:, band]
        order = np.argsort(column, kind="stable")
        sorted_keys = column[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts, ends, strict=True):
            if e - s > 1:
                groups.append(np.sort(order[s:e]))
    return groups


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the root is the cluster's first document


def clusters(
    keys: np.ndarray, shingles_of: Callable[[int], np.ndarray], threshold: float, max_pairs_per_group: int = 50
) -> np.ndarray:
    """The cluster of each document: the index of its first (lowest-index) member. Candidate pairs
    from shared LSH bands are joined only when their true Jaccard similarity is >= threshold (every pair
    in small groups; each member against the group's first few in larger ones)."""
    n = keys.shape[0]
    uf, checked, cache = UnionFind(n), set(), {}

    def shingles(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = np.unique(shingles_of(i))
        return cache[i]

    for group in candidate_groups(keys):
        members = [int(i) for i in group]
        anchors = members if len(members) * (len(members) - 1) // 2 <= max_pairs_per_group else members[:3]
        for x in anchors:
            for y in members:
                if y <= x or (x, y) in checked or uf.find(x) == uf.find(y):
                    continue
                checked.add((x, y))
                if jaccard(shingles(x), shingles(y)) >= threshold:
                    uf.union(x, y)
    return np.array([uf.find(i) for i in range(n)], dtype=np.int64)
