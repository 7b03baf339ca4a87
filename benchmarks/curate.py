"""Curation benchmarks on the offline crawl (built by `python -m scratchlm.curate.crawl`):

1. MinHash signatures (128 permutations, word 5-grams) against datasketch's `MinHash.update_batch` on the
   same documents: documents per second and the ratio, in one run.
2. The whole pipeline on the crawl split into WARC files, every core: `scratchlm curate` against datatrove
   running the same stages (extraction, language ID, Gopher rules, harmful content, PII, exact and MinHash
   document dedup; see `datatrove_peer.py`) on the same files, in one run; then scratchlm with every stage
   (line dedup too).

    python benchmarks/curate.py [--docs 2000] [--crawl data/crawl] [--files 8]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine

from scratchlm.curate.crawl import build_crawl
from scratchlm.curate.extract import extract
from scratchlm.curate.readers import read_warc

SAME_STAGES = ["line_dedup.enabled=false"]  # datatrove has no exact line dedup


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def minhash_table(texts: list[str]) -> list[tuple[str, float]]:
    import datasketch

    import scratchlm.curate.minhash as mh

    hasher = mh.MinHasher(128, 5, 0)
    words = re.compile(r"\w+")

    def theirs() -> None:
        for text in texts:
            w = words.findall(text.lower())
            m = datasketch.MinHash(num_perm=128)
            m.update_batch([" ".join(w[i : i + 5]).encode() for i in range(max(1, len(w) - 4))])

    rows = [("datasketch 1.x MinHash.update_batch", len(texts) / best_of(theirs))]
    if mh._minhash is not None:
        rows.append(("scratchlm (C)", len(texts) / best_of(lambda: hasher.signatures(texts))))
    module, mh._minhash = mh._minhash, None
    try:
        rows.append(("scratchlm (numpy, no C extension)", len(texts) / best_of(lambda: hasher.signatures(texts))))
    finally:
        mh._minhash = module
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--crawl", default=None, help="crawl directory (default: built into a temporary one)")
    parser.add_argument("--files", type=int, default=8, help="WARC files the crawl is split into")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        crawl = build_crawl(Path(args.crawl) if args.crawl else Path(tmp) / "crawl")
        warc = crawl / "crawl.warc.gz"
        texts = [extract(d).text for _, d in zip(range(args.docs), read_warc(warc, lambda *_: None), strict=False)]
        words = sum(len(t.split()) for t in texts)
        print(f"machine: {machine()}")
        print(f"\nMinHash signatures, {len(texts)} crawl documents ({words / len(texts):.0f} words each on average)")
        print(f"{'implementation':<40} {'docs/s':>10} {'vs datasketch':>14}")
        rows = minhash_table(texts)
        for name, rate in rows:
            print(f"{name:<40} {rate:>10.0f} {rate / rows[0][1]:>13.1f}x")
        parts = split_warc(warc, Path(tmp) / "parts", args.files)
        mb = warc.stat().st_size / 1e6
        print(f"\nthe whole pipeline on {warc.name} ({mb:.1f} MB, {docs_in(warc)} HTML pages) split into {args.files}"
              f" WARC files, {os.cpu_count()} workers")  # fmt: skip
        print(f"{'pipeline':<52} {'seconds':>8} {'docs/s':>8} {'kept':>6} {'vs datatrove':>13}")
        docs, peer = docs_in(warc), Path(tmp) / "datatrove"
        command = [sys.executable, str(Path(__file__).parent / "datatrove_peer.py"), str(Path(tmp) / "parts")]
        start = time.perf_counter()
        with open(Path(tmp) / "datatrove.log", "w") as log:  # datatrove logs every task's stats on stderr
            subprocess.run([*command, str(peer), str(os.cpu_count() or 1)], check=True, stdout=log, stderr=log)
        theirs = time.perf_counter() - start
        kept_theirs = count_jsonl(peer / "curated")
        rows = [("datatrove 0.x, the same stages", theirs, kept_theirs)]
        for name, overrides, out in [
            ("scratchlm curate, the same stages", SAME_STAGES, Path(tmp) / "ours"),
            ("scratchlm curate, every stage (+ exact line dedup)", [], Path(tmp) / "ours_all"),
        ]:
            command = [sys.executable, "-m", "scratchlm.cli", "curate", *map(str, parts), "--out", str(out)]
            command += [arg for override in overrides for arg in ("--set", override)]
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            rows.append((name, time.perf_counter() - start, json.loads((out / "report.json").read_text())["docs_out"]))
        for name, seconds, kept in rows:
            print(f"{name:<52} {seconds:>8.1f} {docs / seconds:>8.0f} {kept:>6} {theirs / seconds:>12.2f}x")


def split_warc(warc: Path, out: Path, files: int) -> list[Path]:
    """`warc` cut at record boundaries (each record is its own gzip member) into `files` files of about
    equal size."""
    from fastwarc.warc import ArchiveIterator

    with warc.open("rb") as f:
        starts = [record.stream_pos for record in ArchiveIterator(f, parse_http=False)]
    data = warc.read_bytes()
    out.mkdir(parents=True)
    bounds = [0] + [next(s for s in starts if s >= len(data) * i // files) for i in range(1, files)] + [len(data)]
    paths = [out / f"part-{i:02d}.warc.gz" for i in range(files)]
    for path, lo, hi in zip(paths, bounds, bounds[1:], strict=False):
        path.write_bytes(data[lo:hi])
    return paths


def docs_in(warc: Path) -> int:
    return sum(1 for _ in read_warc(warc, lambda *_: None))


def count_jsonl(folder: Path) -> int:
    return sum(sum(1 for _ in gzip.open(path, "rt")) for path in folder.glob("*.jsonl.gz"))


if __name__ == "__main__":
    main()
