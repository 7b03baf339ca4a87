"""BPE training: scratchlm vs Hugging Face `tokenizers` (ByteLevel BPE trainer, all cores), same input.

    python benchmarks/tokenizer_train.py            # Shakespeare + all ../shared/data corpora, 3 sizes

Each run is a fresh process. Peak memory: HF is one process (threads); scratchlm is a main process
plus worker processes, so its figure is main + workers x largest worker (an upper bound).
Targets (issue 2): time ratio <= 1.0, memory ratio <= 2.0.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import concatenate, corpora_dir, isolated, machine, table

OURS = """
import time
from scratchlm.tokenizer import train_bpe
t = time.perf_counter()
vocab, merges = train_bpe({path!r}, {vocab}, ["<|endoftext|>"])
RESULT = dict(seconds=time.perf_counter() - t, vocab=len(vocab))
"""
PEER = """
import time
from tokenizers import ByteLevelBPETokenizer
t = time.perf_counter()
tok = ByteLevelBPETokenizer()
tok.train([{path!r}], vocab_size={vocab}, min_frequency=0, special_tokens=["<|endoftext|>"], show_progress=False)
RESULT = dict(seconds=time.perf_counter() - t, vocab=tok.get_vocab_size())
"""


def main() -> None:
    from scratchlm.data.sources import shakespeare_files

    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpora = corpora_dir(tmp)
        all_bytes = sum(p.stat().st_size for p in corpora)
        inputs = [("shakespeare", concatenate(shakespeare_files(), tmp / "shakespeare.txt"))]
        for fraction in (0.25, 0.5, 1.0):
            name = "all corpora" if fraction == 1.0 else f"corpora {fraction:.0%}"
            inputs.append((name, concatenate(corpora, tmp / f"corpora_{fraction}.txt", int(all_bytes * fraction))))
        rows = []
        for name, path in inputs:
            for vocab in (10_000, 32_000):
                ours = isolated(OURS.format(path=str(path), vocab=vocab))
                peer = isolated(PEER.format(path=str(path), vocab=vocab))
                ours_mb = ours["peak_self_mb"] + workers * ours["peak_child_mb"]
                peer_mb = peer["peak_self_mb"]
                rows.append([
                    name, f"{path.stat().st_size / 1e6:.1f}", f"{vocab:,}",
                    f"{ours['seconds']:.2f}", f"{peer['seconds']:.2f}", f"{ours['seconds'] / peer['seconds']:.2f}",
                    f"{ours_mb:.0f}", f"{peer_mb:.0f}", f"{ours_mb / peer_mb:.2f}",
                ])  # fmt: skip
                print(table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
    print(f"\nmachine: {machine()}\n")
    print(table(HEADERS, rows))


HEADERS = ["corpus", "MB", "vocab", "scratchlm s", "HF s", "time ratio", "scratchlm MB", "HF MB", "mem ratio"]

if __name__ == "__main__":
    main()
