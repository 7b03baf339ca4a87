"""The curation pipeline: inputs -> shards -> per-document stages -> exact and MinHash document dedup
-> exact line dedup -> kept / removed JSONL.gz shards, plain text and a report.

Five phases, each writing its outputs atomically under `OUT/work/` so that an interrupted run resumes
where it stopped (a finished shard's stats file exists and the shard is skipped):

1. filter (per shard, in parallel): read, extract, size, language, Gopher, harmful, quality, PII masking;
   the kept documents, each one's text hash and MinHash signature.
2. clusters (global): exact duplicates (the first in corpus order kept), then LSH candidate pairs
   verified by true Jaccard and joined by union-find; one document kept per cluster.
3. count (per shard): the line hashes (with counts) of the documents that survive.
4. lines (global): the line hashes seen more than once, merged range by range from the shard files.
5. write (per shard): duplicated lines removed everywhere, documents left empty dropped;
   `kept/part-N.jsonl.gz`, `removed/part-N.jsonl.gz`, `text/part-N.txt`.

Documents are deduplicated before lines, so that two copies of a page become one page, not two pages
stripped of every line they share. The per-shard phases run as jobs through the executor (local
processes, or Ray), the global ones in this process over files on disk.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from scratchlm.atomic import atomic_open, atomic_write_text
from scratchlm.curate.config import CurateConfig
from scratchlm.curate.document import Document
from scratchlm.curate.readers import html_files, kind_of, read_html_file, read_input
from scratchlm.errors import ScratchLMError

EOT = "<|endoftext|>"


def plan_shards(inputs: list[Path], shard_docs: int, shard_mb: float) -> list[dict]:
    """Shards as {"files", "part", "parts"}: a folder of HTML is cut into shards of `shard_docs` files;
    a file larger than `shard_mb` into parts (part p takes the records whose index is p modulo parts),
    so one big WARC still keeps every core busy."""
    shards: list[dict] = []
    for path in inputs:
        if not path.exists():
            raise ScratchLMError(f"input not found: {path}")
        if path.is_dir():
            files = html_files(path)
            if not files:
                raise ScratchLMError(f"{path}: no .html / .htm files in this folder")
            for i in range(0, len(files), shard_docs):
                shards.append({"files": [str(f) for f in files[i : i + shard_docs]], "part": 0, "parts": 1})
        else:
            kind_of(path)  # an unknown kind is an error now, not in a worker
            parts = max(1, math.ceil(path.stat().st_size / (shard_mb * 1e6)))
            shards += [{"files": [str(path)], "part": p, "parts": parts} for p in range(parts)]
    return shards


def read_shard(shard: dict, on_error: Callable[[str, str], None]) -> Iterator[Document]:
    files, part, parts = shard["files"], shard["part"], shard["parts"]
    for name in files:
        path = Path(name)
        if kind_of(path) == "html" and len(files) > 1:  # a folder's shard: ids carry the relative path
            try:
                yield read_html_file(path, str(path))
            except OSError as exc:
                on_error(str(path), f"unreadable ({exc.strerror})")
        else:
            for index, doc in enumerate(read_input(path, on_error)):
                if index % parts == part:
                    yield doc


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    with atomic_open(path) as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6, mtime=0) as gz:
        gz.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8"))


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class Pipeline:
    """One curation run in `out`: its config, its shards, and the state of each phase on disk."""

    def __init__(self, out: Path, config: CurateConfig, shards: list[dict]) -> None:
        self.out, self.config, self.shards = out, config, shards
        self.work = out / "work"
        self._filters = None  # built once per process: loading the classifiers costs seconds

    # --- the run's identity: a different config or input set is refused, not mixed in
    @staticmethod
    def fingerprint(config_toml: str, shards: list[dict]) -> str:
        return hashlib.sha256((config_toml + json.dumps(shards)).encode()).hexdigest()[:16]

    def claim(self, config_toml: str) -> None:
        """Record the run in `out/run.json`, or check that an existing run there is this one."""
        stamp = self.out / "run.json"
        key = self.fingerprint(config_toml, self.shards)
        if stamp.exists():
            existing = json.loads(stamp.read_text())
            if existing.get("key") != key:
                raise ScratchLMError(
                    f"{self.out} holds a curation run with another config or other inputs "
                    f"(run.json key {existing.get('key')}, this run {key}): give a new --out"
                )
            return
        if self.out.exists() and any(self.out.iterdir()):
            raise ScratchLMError(f"{self.out} is not empty and holds no curation run: give a new or empty --out")
        self.work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.work / "config.toml", config_toml)
        atomic_write_text(self.work / "shards.json", json.dumps(self.shards))
        atomic_write_text(stamp, json.dumps({"key": key, "shards": len(self.shards)}) + "\n")

    # --- file names
    def docs_file(self, i: int) -> Path:
        return self.work / f"filter-{i:05d}.jsonl.gz"

    def stats_file(self, phase: str, i: int) -> Path:
        return self.work / f"{phase}-{i:05d}.stats.json"

    def removed_file(self, i: int) -> Path:
        return self.work / f"removed-filter-{i:05d}.jsonl.gz"

    def left(self, phase: str) -> list[int]:
        return [i for i in range(len(self.shards)) if not self.stats_file(phase, i).exists()]

    # --- phase 1
    def filter_shard(self, i: int) -> None:
        from scratchlm.curate.dedup import hash64
        from scratchlm.curate.minhash import MinHasher
        from scratchlm.curate.stages import Filters, ShardStats

        if self._filters is None:
            self._filters = Filters(self.config)
        stats = ShardStats(examples=self.config.examples)
        docs = list(read_shard(self.shards[i], stats.error))
        kept = [doc.to_json() for doc in self._filters.apply(docs, stats)]
        m = self.config.minhash
        hasher = MinHasher(m.num_perm, m.ngram, m.seed)
        signatures = [hasher.signature(d["text"]) for d in kept] if m.enabled else []
        with atomic_open(self.work / f"sign-{i:05d}.npz") as f:
            np.savez(
                f,
                doc_hashes=np.array([hash64(d["text"]) for d in kept], np.uint64),
                signatures=np.stack(signatures) if signatures else np.zeros((0, m.num_perm), np.uint32),
            )
        write_jsonl_gz(self.removed_file(i), [doc.to_json() for doc in docs if doc.removed_by])
        write_jsonl_gz(self.docs_file(i), kept)
        atomic_write_text(self.stats_file("filter", i), json.dumps(stats.to_json()))

    # --- phase 2
    def survivors(self) -> dict[str, np.ndarray]:
        """Per document kept by phase 1 (in shard order): `reason` 0 kept, 1 exact duplicate, 2 near
        duplicate; `cluster`: the first document of its cluster."""
        path = self.work / "clusters.npz"
        if not path.exists():
            self._write_survivors(path)
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def _write_survivors(self, path: Path) -> None:
        from scratchlm.curate.dedup import first_occurrences
        from scratchlm.curate.minhash import band_keys, clusters, shingle_hashes

        parts = [np.load(self.work / f"sign-{i:05d}.npz") for i in range(len(self.shards))]
        doc_hashes = np.concatenate([p["doc_hashes"] for p in parts])
        n = len(doc_hashes)
        reason, cluster = np.zeros(n, np.int8), np.arange(n)
        if self.config.doc_dedup.enabled:
            reason[~first_occurrences(doc_hashes)] = 1
        m = self.config.minhash
        if m.enabled and n:
            live = np.flatnonzero(reason == 0)
            keys = band_keys(np.concatenate([p["signatures"] for p in parts])[live], m.bands)
            texts = self._texts()
            local = clusters(keys, lambda j: shingle_hashes(texts[live[j]], m.ngram), m.threshold)
            cluster[live] = live[local]
            reason[live[local != np.arange(len(live))]] = 2
        with atomic_open(path) as f:
            np.savez(f, reason=reason, cluster=cluster)

    def _texts(self) -> list[str]:
        return [r["text"] for i in range(len(self.shards)) for r in read_jsonl_gz(self.docs_file(i))]

    def offsets(self) -> list[int]:
        counts = [len(np.load(self.work / f"sign-{i:05d}.npz")["doc_hashes"]) for i in range(len(self.shards))]
        return [int(x) for x in np.r_[0, np.cumsum(counts)]]

    def _surviving(self, i: int) -> list[tuple[dict, int, int]]:
        """(record, reason, cluster) for each document phase 1 kept in shard i."""
        survivors, start = self.survivors(), self.offsets()[i]
        return [
            (r, int(survivors["reason"][start + j]), int(survivors["cluster"][start + j]))
            for j, r in enumerate(read_jsonl_gz(self.docs_file(i)))
        ]

    # --- phase 3
    def count_shard(self, i: int) -> None:
        from scratchlm.curate.dedup import line_hashes, save_counts

        on = self.config.line_dedup.enabled
        hashes, counts = line_hashes([r["text"] for r, reason, _ in self._surviving(i) if reason == 0 and on])
        with atomic_open(self.work / f"lines-{i:05d}.npy") as f:
            save_counts(f, hashes, counts)
        atomic_write_text(self.stats_file("count", i), "{}")

    # --- phase 4
    def duplicated_lines(self) -> np.ndarray:
        from scratchlm.curate.dedup import duplicated_hashes

        path = self.work / "duplicated_lines.npy"
        if not path.exists():
            found = duplicated_hashes([self.work / f"lines-{k:05d}.npy" for k in range(len(self.shards))])
            with atomic_open(path) as f:
                np.save(f, found)
        return np.load(path)

    # --- phase 5
    def write_shard(self, i: int) -> None:
        from scratchlm.curate.dedup import remove_lines
        from scratchlm.curate.stages import ShardStats

        duplicated = self.duplicated_lines()
        c, stats = self.config, ShardStats(examples=self.config.examples)
        kept, removed = [], read_jsonl_gz(self.removed_file(i))
        for record, reason, cluster in self._surviving(i):
            doc = Document(record["id"], record["text"], url=record.get("url"))
            size = len(doc.text.encode("utf-8"))
            if c.doc_dedup.enabled:
                stats.record("doc_dedup", doc, size, "exact_duplicate" if reason == 1 else None)
            if reason != 1 and c.minhash.enabled:
                stats.record("minhash", doc, size, "near_duplicate" if reason == 2 else None)
            if not doc.removed_by and c.line_dedup.enabled:
                doc.text, lines_removed = remove_lines(doc.text, duplicated)
                record["text"], record["duplicate_lines_removed"] = doc.text, lines_removed
                stats.record("line_dedup", doc, size, None if doc.text.strip() else "duplicate_lines_only")
            if doc.removed_by:
                record["removed_by"] = doc.removed_by
                if reason:
                    record["duplicate_of"] = cluster
                removed.append(record)
            else:
                kept.append(record)
        text = "".join(r["text"].rstrip("\n") + "\n" + EOT + "\n" for r in kept)
        atomic_write_text(self.out / "text" / f"part-{i:05d}.txt", text)
        write_jsonl_gz(self.out / "removed" / f"part-{i:05d}.jsonl.gz", removed)
        write_jsonl_gz(self.out / "kept" / f"part-{i:05d}.jsonl.gz", kept)
        atomic_write_text(self.stats_file("write", i), json.dumps(stats.to_json()))

    def run_shard(self, phase: str, i: int) -> None:
        {"filter": self.filter_shard, "count": self.count_shard, "write": self.write_shard}[phase](i)

    @classmethod
    def open(cls, out: Path) -> Pipeline:
        """The run in `out` as `claim` recorded it (what a worker job reads)."""
        from scratchlm.train.config import load_dataclass

        config = load_dataclass(CurateConfig, out / "work" / "config.toml")
        return cls(out, config, json.loads((out / "work" / "shards.json").read_text()))


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
