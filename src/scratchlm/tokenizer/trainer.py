"""Byte-level BPE training.

1. Pre-token counting (parallel, streaming): each file is read in blocks cut at safe boundaries
   (see `SpecialTokenSplitter.safe_cut`); worker processes split each chunk on special tokens,
   pre-tokenize it with the GPT-2 pattern and count pre-tokens. Memory grows with the number of
   distinct pre-tokens, not with the corpus.
2. Merging: every distinct pre-token becomes a sequence of token ids with a count. Pair counts are
   kept in a dict, an index maps each pair to the pre-tokens that contain it, and a lazy max-heap
   yields the most frequent pair (ties: the lexicographically greater `(bytes_a, bytes_b)`). After a
   merge only the pre-tokens that held the pair are rewritten and their pair counts adjusted.
   `merge_reference` below is that loop in Python; `_merge.c` is the same loop in C (tested equal),
   used when it was built.
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from scratchlm.errors import ScratchLMError
from scratchlm.executor import map_bounded
from scratchlm.tokenizer import fast
from scratchlm.tokenizer.bpe import check_special_tokens
from scratchlm.tokenizer.pretokenize import SpecialTokenSplitter, decode_utf8, read_chunks

try:
    from scratchlm.tokenizer import _merge
except ImportError:  # no compiled extension: merge_reference does the same, slower
    _merge = None


def _count_chunk(args: tuple[bytes, Sequence[str], str, int]) -> tuple[Counter[str], int]:
    data, special_tokens, path, offset = args
    text = decode_utf8(data, Path(path), offset)
    counts: Counter[str] = Counter()
    for segment in SpecialTokenSplitter(special_tokens).ordinary_segments(text):
        fast.count_pretokens(segment, counts)
    return counts, len(data)


def count_pretokens(
    paths: Sequence[Path],
    special_tokens: Sequence[str] = (),
    workers: int | None = None,
    progress: bool = False,
) -> Counter[str]:
    """Count GPT-2 pre-tokens over files, in parallel, holding a bounded number of chunks at once."""
    splitter = SpecialTokenSplitter(special_tokens)
    workers = workers or os.cpu_count() or 1

    def work_items() -> Iterator[tuple[bytes, Sequence[str], str, int]]:
        for path in paths:
            offset = 0
            for chunk in read_chunks(path, splitter):
                yield chunk, special_tokens, str(path), offset
                offset += len(chunk)

    totals: Counter[str] = Counter()
    total_bytes = sum(p.stat().st_size for p in paths)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="count pre-tokens", disable=not progress) as bar:
        for counts, n_bytes in map_bounded(_count_chunk, work_items(), workers):
            totals.update(counts)
            bar.update(n_bytes)
    return totals


def _inverted(token: bytes) -> tuple[int, ...]:
    """A key that sorts byte strings in reverse lexicographic order (a prefix sorts after)."""
    return (*(255 - b for b in token), 256)


def train_bpe_from_counts(
    word_counts: dict[str, int],
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    progress: bool = False,
    use_c: bool = True,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Learn merges from pre-token counts. Ids: 0-255 bytes, then special tokens, then merges."""
    check_special_tokens(special_tokens)
    special_tokens = list(dict.fromkeys(special_tokens))
    vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
    for token in special_tokens:
        vocab[len(vocab)] = token.encode("utf-8")
    if vocab_size < len(vocab):
        raise ScratchLMError(
            f"vocab_size {vocab_size} is too small: the 256 byte values and {len(special_tokens)} "
            f"special token(s) already need {len(vocab)}"
        )
    words: list[bytes] = []
    counts: list[int] = []
    for word, count in word_counts.items():
        encoded = word.encode("utf-8")
        if len(encoded) > 1:
            words.append(encoded)
            counts.append(count)
    with tqdm(total=vocab_size - len(vocab), desc="merges", unit="tok", disable=not progress) as bar:
        done = len(vocab)

        def report(n_tokens: int) -> None:
            nonlocal done
            bar.update(n_tokens - done)
            done = n_tokens

        merge = _merge.train if (_merge is not None and use_c) else merge_reference
        steps = merge(words, counts, list(vocab.values()), vocab_size, report)
        merges = []
        for a, b, new_id in steps:
            vocab.setdefault(new_id, vocab[a] + vocab[b])
            merges.append((vocab[a], vocab[b]))
        report(len(vocab))
    return vocab, merges


def merge_reference(
    words: list[bytes], counts: list[int], tokens: list[bytes], vocab_size: int, report: Callable[[int], None]
) -> list[tuple[int, int, int]]:
    """The merge loop: `(a, b, merged_id)` for each merge, in order (merged_id is new unless those
    bytes already have an id). Word ids start as their bytes (ids 0-255 are the byte values)."""
    token_bytes = list(tokens)
    key_of = [_inverted(b) for b in token_bytes]
    id_of_bytes = {b: i for i, b in enumerate(token_bytes)}
    word_ids = [list(w) for w in words]

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (ids, count) in enumerate(zip(word_ids, counts, strict=True)):
        for pair in itertools.pairwise(ids):
            pair_counts[pair] += count
            where[pair].add(w)
    heap = [(-c, key_of[a], key_of[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    steps: list[tuple[int, int, int]] = []
    while len(token_bytes) < vocab_size and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -neg or neg == 0:
            continue  # stale heap entry
        merged = token_bytes[a] + token_bytes[b]
        new_id = id_of_bytes.get(merged)
        if new_id is None:  # the same bytes can arise from two different merges: keep one id
            new_id = len(token_bytes)
            token_bytes.append(merged)
            key_of.append(_inverted(merged))
            id_of_bytes[merged] = new_id
            if len(token_bytes) % 256 == 0:
                report(len(token_bytes))
        steps.append((a, b, new_id))
        changed = _apply_merge(word_ids, counts, (a, b), new_id, pair_counts, where)
        for pair in changed:
            c = pair_counts.get(pair, 0)
            if c > 0:
                heapq.heappush(heap, (-c, key_of[pair[0]], key_of[pair[1]], *pair))
    return steps


def _apply_merge(
    words: list[list[int]],
    counts: list[int],
    pair: tuple[int, int],
    new_id: int,
    pair_counts: dict[tuple[int, int], int],
    where: dict[tuple[int, int], set[int]],
) -> set[tuple[int, int]]:
    """Rewrite the words holding `pair`, updating pair counts; return the pairs whose count changed."""
    changed: set[tuple[int, int]] = set()
    for w in where.pop(pair, ()):
        old = words[w]
        new = fast.merge_pair(old, pair, new_id)
        if len(new) == len(old):
            continue  # stale index entry: the pair left this word in an earlier merge
        count = counts[w]
        for p in itertools.pairwise(old):
            pair_counts[p] -= count
            changed.add(p)
        for p in itertools.pairwise(new):
            pair_counts[p] += count
            changed.add(p)
            where[p].add(w)
        words[w] = new
    pair_counts.pop(pair, None)
    changed.discard(pair)
    return changed


def train_bpe(
    input_paths: str | os.PathLike | Sequence[str | os.PathLike],
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    workers: int | None = None,
    progress: bool = False,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE tokenizer on text files.

    Returns `vocab` (id -> bytes; exactly `vocab_size` entries unless the corpus runs out of pairs)
    and `merges` in creation order.
    """
    if isinstance(input_paths, str | os.PathLike):
        input_paths = [input_paths]
    paths = [Path(p) for p in input_paths]
    if not paths:
        raise ScratchLMError("no input files given")
    for path in paths:
        if not path.is_file():
            raise ScratchLMError(f"input file not found: {path}")
    check_special_tokens(special_tokens)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise ScratchLMError(f"vocab_size: expected an integer, got {vocab_size!r}")
    if vocab_size < 256 + len(set(special_tokens)):
        train_bpe_from_counts({}, vocab_size, special_tokens)  # raises the clear error
    if not any(p.stat().st_size for p in paths):
        raise ScratchLMError(f"the corpus is empty: no text in {', '.join(map(str, paths))}")
    word_counts = count_pretokens(paths, special_tokens, workers, progress)
    if not word_counts:
        raise ScratchLMError(f"the corpus is empty: no text in {', '.join(map(str, paths))}")
    return train_bpe_from_counts(word_counts, vocab_size, special_tokens, progress)
