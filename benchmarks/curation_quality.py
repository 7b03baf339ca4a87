"""The point of curation: the same model and token budget trained on the raw extracted crawl and on the
curated one (with the quality classifier added, and with each stage left out in turn), scored by validation
bits per byte on clean held-out English text (the first MB of `enwiki_excerpt` from ../shared/data/corpora,
in no training set).

    python benchmarks/curation_quality.py [--steps 600] [--ablations] [--work runs/curation-quality]

Each variant: `scratchlm curate` (the raw variant with every stage off) -> its own BPE tokenizer (vocab
2048; bits per byte make tokenizers comparable) -> `scratchlm train` for a fixed number of steps ->
`scratchlm eval` on the held-out text. The quality classifier (`scratchlm curate-quality`) learns from
reference-quality positives (the rest of enwiki_excerpt and the Brown corpus) against the raw variant's
text as negatives. Finished variants are skipped on a rerun (results.json).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, machine

from scratchlm.atomic import atomic_write_text

OFF = ["language", "gopher", "harmful", "pii", "line_dedup", "doc_dedup", "minhash"]
QUALITY = "curated + quality classifier"
VARIANTS = {"raw": [f"{s}.enabled=false" for s in OFF], "curated": [], QUALITY: ["quality.enabled=true"]}
ABLATIONS = {f"curated without {s}": [f"{s}.enabled=false"] for s in OFF}

CONFIG = """batch_size = 16
max_steps = {steps}
eval_every = {steps}
eval_tokens = 200000
log_every = 100
checkpoint_every = {steps}
out_dir = "{out}"

[model]
vocab_size = 2048
context_length = 128
d_model = 128
n_layers = 4
n_heads = 4

[optim]
lr = 6e-3
min_lr = 3e-4
warmup_steps = 50
weight_decay = 0.1
grad_clip = 1.0

[data]
train_tokens = "{data}/train.bin"
val_tokens = "{data}/val.bin"
tokenizer = "{data}/tokenizer"
"""


def scratchlm(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "scratchlm.cli", *args], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"scratchlm {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def run_variant(name: str, sets: list[str], warc: Path, val_text: Path, work: Path, steps: int) -> dict:
    slug = name.replace(" ", "-")
    curated, data = work / slug / "curated", work / slug / "data"
    options = [x for s in sets for x in ("--set", s)]
    scratchlm("curate", str(warc), "--out", str(curated), *options)
    text_files = sorted(str(p) for p in (curated / "text").glob("*.txt"))
    train_bytes = sum(Path(p).stat().st_size for p in text_files)
    if not (data / "tokenizer").exists():
        scratchlm(
            "tokenizer", "train", "--corpus", *text_files, "--vocab-size", "2048", "--out", str(data / "tokenizer")
        )
    if not (data / "train.bin").exists():
        scratchlm(
            "tokenizer", "encode", *text_files, "--tokenizer", str(data / "tokenizer"), "--out", str(data / "train.bin")
        )
    if not (data / "val.bin").exists():
        scratchlm(
            "tokenizer", "encode", str(val_text), "--tokenizer", str(data / "tokenizer"), "--out", str(data / "val.bin")
        )
    config = work / slug / "train.toml"
    config.write_text(CONFIG.format(steps=steps, out=work / slug / "run", data=data))
    scratchlm("train", "--config", str(config))
    from scratchlm.train.evaluate import evaluate_run

    result = evaluate_run(str(work / slug / "run"), [])
    return {
        "variant": name,
        "train_mb": train_bytes / 1e6,
        "val_bpb": result["bits_per_byte"],
        "val_loss": result["loss"],
    }


def quality_classifier(work: Path, positives: Path) -> Path:
    """Trained once, on the positives against the raw variant's text."""
    model = work / "quality-classifier"
    if not (model / "weights.npz").exists():
        raw_text = sorted(str(p) for p in (work / "raw" / "curated" / "text").glob("*.txt"))
        scratchlm("curate-quality", "--positive", str(positives), "--negative", *raw_text, "--out", str(model))
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--ablations", action="store_true", help="also each stage left out in turn")
    parser.add_argument("--work", default="runs/curation-quality")
    parser.add_argument("--crawl", default="data/crawl")
    args = parser.parse_args()
    from scratchlm.curate.crawl import build_crawl

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    warc = build_crawl(Path(args.crawl)) / "crawl.warc.gz"
    val_text, positives = work / "heldout-enwiki.txt", work / "quality-positives.txt"
    if not positives.exists():
        wiki = gzip.decompress((SHARED / "corpora" / "enwiki_excerpt.txt.gz").read_bytes()).decode()
        brown = gzip.decompress((SHARED / "corpora" / "brown.txt.gz").read_bytes()).decode()
        atomic_write_text(val_text, wiki[:1_000_000])
        atomic_write_text(positives, wiki[1_000_000:] + "\n" + brown)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    variants = {**VARIANTS, **(ABLATIONS if args.ablations else {})}
    for name, sets in variants.items():
        if name == QUALITY:
            sets = [*sets, f"quality.model={quality_classifier(work, positives)}"]
        if name not in results:
            results[name] = run_variant(name, sets, warc, val_text, work, args.steps)
            atomic_write_text(results_path, json.dumps(results, indent=1) + "\n")
        r = results[name]
        print(f"{name:<32} train text {r['train_mb']:6.2f} MB   val bits/byte {r['val_bpb']:.4f}", flush=True)
    print(f"machine: {machine()}; {args.steps} steps of 16 x 128 tokens each variant")


if __name__ == "__main__":
    main()
