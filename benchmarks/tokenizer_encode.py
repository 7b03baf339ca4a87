"""Encoding with the GPT-2 vocabulary: scratchlm vs tiktoken (single thread), same text, same ids.

    python benchmarks/tokenizer_encode.py

Each measurement is a fresh process with a fresh tokenizer (a cold pre-token cache: no credit for
having seen the text before). "file encoder" is `scratchlm tokenizer encode`'s parallel path
(all cores, reading the file and writing uint16 tokens to disk), against tiktoken's single thread.
Targets (issue 2): single process >= 1.0x tiktoken; parallel file encoder >= 1.5x.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, concatenate, corpora_dir, isolated, machine, table

SETUP = f"""
import time
from pathlib import Path
from scratchlm.tokenizer.stats import load_gpt2
gpt2 = load_gpt2(Path({str(SHARED)!r}))
text = Path({{path!r}}).read_text(encoding="utf-8")
n_bytes = len(text.encode())
"""
OURS = (
    SETUP
    + """
t = time.perf_counter(); ids = gpt2.encode(text); s = time.perf_counter() - t
RESULT = dict(mb_s=n_bytes / s / 1e6, tokens=len(ids))
"""
)
PEER = (
    SETUP
    + """
enc = gpt2.to_tiktoken("gpt2")
t = time.perf_counter(); ids = enc.encode_ordinary(text); s = time.perf_counter() - t
RESULT = dict(mb_s=n_bytes / s / 1e6, tokens=len(ids))
"""
)
FILES = (
    SETUP
    + """
from scratchlm.data.encode import encode_files
t = time.perf_counter()
meta = encode_files(gpt2, [Path({path!r})], Path({out!r}), eot_after_each_file=False, progress=False)
s = time.perf_counter() - t
RESULT = dict(mb_s=n_bytes / s / 1e6, tokens=meta["tokens"])
"""
)


def main() -> None:
    from scratchlm.data.sources import shakespeare_files

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpora = corpora_dir(tmp)
        inputs = [("shakespeare", concatenate(shakespeare_files(), tmp / "shakespeare.txt"))]
        inputs += [(p.stem, p) for p in corpora]
        inputs.append(("all corpora", concatenate(corpora, tmp / "all.txt")))
        rows = []
        for name, path in inputs:
            ours = isolated(OURS.format(path=str(path)))
            peer = isolated(PEER.format(path=str(path)))
            files = isolated(FILES.format(path=str(path), out=str(tmp / "out.bin")))
            assert ours["tokens"] == peer["tokens"] == files["tokens"], (name, ours, peer, files)
            rows.append([
                name, f"{path.stat().st_size / 1e6:.1f}", f"{ours['mb_s']:.1f}", f"{peer['mb_s']:.1f}",
                f"{ours['mb_s'] / peer['mb_s']:.2f}", f"{files['mb_s']:.1f}", f"{files['mb_s'] / peer['mb_s']:.2f}",
            ])  # fmt: skip
            print(table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
    print(f"\nmachine: {machine()}\n")
    print(table(HEADERS, rows))


HEADERS = ["corpus", "MB", "scratchlm MB/s", "tiktoken MB/s", "ratio", "file encoder MB/s", "file ratio"]

if __name__ == "__main__":
    main()
