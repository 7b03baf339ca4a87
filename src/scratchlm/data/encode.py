"""Text files -> one token array on disk, in parallel and in bounded memory.

The output is a flat array of token ids (`uint16` when every id fits, else `uint32`) that
`numpy.memmap` reads directly, plus a JSON sidecar `<name>.json`:
`{"tokenizer": fingerprint, "dtype", "tokens", "bytes", "files", "eot_after_each_file"}`.
Files are cut into chunks at safe pre-token boundaries, chunks are encoded by worker processes and
written in order to a temporary file that is renamed into place only when everything succeeded.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scratchlm.atomic import atomic_open, atomic_write_text, check_writable
from scratchlm.errors import ScratchLMError
from scratchlm.executor import map_bounded
from scratchlm.tokenizer.bpe import Tokenizer
from scratchlm.tokenizer.pretokenize import decode_utf8, read_chunks

EOT = "<|endoftext|>"
ENCODE_CHUNK_BYTES = 1 << 20
# Below this much input a process pool costs more than it saves (measured: benchmarks/tokenizer_encode.py).
PARALLEL_MIN_BYTES = 24 << 20

_worker_tokenizer: Tokenizer | None = None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _init_worker(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], specials: list[str]) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(vocab, merges, specials)


def _encode_chunk(args: tuple[bytes, str, int, str]) -> tuple[bytes, int]:
    data, path, offset, dtype = args
    assert _worker_tokenizer is not None
    ids = _worker_tokenizer.encode(decode_utf8(data, Path(path), offset))
    return np.asarray(ids, dtype=dtype).tobytes(), len(data)


def encode_files(
    tokenizer: Tokenizer,
    paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    workers: int | None = None,
    eot_after_each_file: bool = True,
    progress: bool = True,
) -> dict:
    """Encode `paths` (in order) into `out_path`; returns the sidecar metadata it also writes.

    workers: processes to encode with (default: all cores when the input is large enough to pay off).
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise ScratchLMError(f"input file not found: {path}")
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ScratchLMError(f"{out_path} is a directory: expected the name of a token file, e.g. {out_path}/train.bin")
    check_writable(out_path.parent)
    dtype = token_dtype(tokenizer.vocab_size)
    eot_id = tokenizer.special_ids.get(EOT) if eot_after_each_file else None
    specials = tokenizer.special_tokens
    total_bytes = sum(p.stat().st_size for p in paths)
    if workers is None:
        workers = (os.cpu_count() or 1) if total_bytes >= PARALLEL_MIN_BYTES else 1
    global _worker_tokenizer
    _worker_tokenizer = tokenizer  # used in-process, and inherited by forked workers
    # Forked workers inherit the built tokenizer; spawned ones (macOS, Windows) rebuild it.
    forked = multiprocessing.get_start_method() == "fork"
    initializer, initargs = (None, ()) if forked else (_init_worker, (tokenizer.vocab, tokenizer.merges, specials))

    def items() -> Iterator[tuple[bytes, str, int, str]]:
        for path in paths:
            offset = 0
            for chunk in read_chunks(path, tokenizer.splitter, ENCODE_CHUNK_BYTES):
                yield chunk, str(path), offset, dtype.str
                offset += len(chunk)
            yield b"", str(path), -1, dtype.str  # end-of-file marker

    n_tokens = 0
    try:
        with (
            atomic_open(out_path) as out,
            tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"encode {out_path.name}",
                 disable=not progress) as bar,
        ):  # fmt: skip
            results = map_bounded(_encode_chunk, items(), workers, initializer=initializer, initargs=initargs)
            for data, n_bytes in results:
                if n_bytes == 0 and not data:  # a file ended
                    if eot_id is not None:
                        out.write(np.asarray([eot_id], dtype=dtype).tobytes())
                        n_tokens += 1
                    continue
                out.write(data)
                n_tokens += len(data) // dtype.itemsize
                bar.update(n_bytes)
                bar.set_postfix(tokens=n_tokens)
        meta = {
            "tokenizer": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name,
            "tokens": n_tokens,
            "bytes": total_bytes,
            "files": [str(p) for p in paths],
            "eot_after_each_file": eot_id is not None,
        }
        atomic_write_text(sidecar_path(out_path), json.dumps(meta, indent=1) + "\n")
    except OSError as exc:  # a full disk: the temporary file is gone, earlier output stays
        raise ScratchLMError(f"could not write {out_path}: {exc.strerror or exc}") from None
    return meta


def sidecar_path(token_path: str | os.PathLike) -> Path:
    return Path(token_path).with_suffix(".json")


def load_tokens(token_path: str | os.PathLike) -> tuple[np.memmap, dict]:
    """Memory-map a token array after checking it against its sidecar: the dtype is the one the
    tokenizer's vocabulary needs, and the file holds exactly `tokens` ids of that dtype."""
    token_path = Path(token_path)
    meta_path = sidecar_path(token_path)
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
    except FileNotFoundError:
        raise ScratchLMError(f"{meta_path} is missing: encode the corpus with `scratchlm tokenizer encode`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScratchLMError(f"{meta_path}: not a token-array sidecar ({exc})") from None
    if not isinstance(meta, dict):
        raise ScratchLMError(f"{meta_path}: not a token-array sidecar (expected a JSON object)")
    for key, kind in (("tokenizer", str), ("vocab_size", int), ("dtype", str), ("tokens", int)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            expected = "a string" if kind is str else "an integer"
            raise ScratchLMError(
                f"{meta_path}: not a token-array sidecar: field {key!r} is {meta.get(key)!r}, expected {expected}"
            )
    expected = token_dtype(meta["vocab_size"])
    if meta["dtype"] != expected.name:
        raise ScratchLMError(
            f"{meta_path}: field 'dtype' is {meta['dtype']!r}, expected {expected.name!r} "
            f"(the dtype for a vocabulary of {meta['vocab_size']:,} tokens)"
        )
    if not token_path.is_file():
        raise ScratchLMError(f"token array not found: {token_path}")
    size, want = token_path.stat().st_size, meta["tokens"] * expected.itemsize
    if meta["tokens"] < 0 or size != want:
        raise ScratchLMError(
            f"{token_path}: holds {size:,} bytes, but its sidecar says {meta['tokens']:,} {expected.name} tokens "
            f"({want:,} bytes): the file is truncated or not the one the sidecar describes; encode it again"
        )
    if size == 0:
        raise ScratchLMError(f"{token_path}: holds no tokens")
    return np.memmap(token_path, dtype=expected, mode="r"), meta
