"""Int8 decoding against float32, batch 1: tokens/s and memory-bandwidth utilisation (MBU) on a model
well above the L3 cache, the machine's bandwidth measured in the same run; and held-out bits per byte
of a trained run decoded both ways.

    python benchmarks/quantized_decode.py [--run RUN] [--eval-tokens 4096]

Speed: random-weight models of 390 MB (d_model 768, 12 layers, d_ff 2048) and 1.37 GB (d_model 2048, 6
layers, d_ff 5632) of float32 weights streamed per token, vocab 16384, greedy, 64 new tokens after a
16-token prompt, median of 3 alternating rounds. MBU = bytes of weights read per token x tokens/s / the
bandwidth of a large `copy_` (read + write). Quality: `--run` (default: the curated run of
benchmarks/curation_quality.py when present) decodes its validation tokens one position a step with the
KV cache, float32 then int8; bits per byte
over the same tokens (bfloat16 too). Targets (issue 15): int8 >= 2x float32 tokens/s; bits per byte
within 1%.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table
from generate_decode import IdTokenizer

PROMPT_TOKENS, NEW_TOKENS = 16, 64
DEFAULT_RUN = Path("runs/curation-quality/curated/run")


def bandwidth() -> float:
    """Bytes per second of a 512 MB float32 copy (read + write), the best of 5."""
    a, b = torch.ones(128 * 2**20), torch.empty(128 * 2**20)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.numel() * 4 / best


SHAPES = {  # name: (d_model, n_layers, n_heads, d_ff); vocab 16384 for both
    "d768": (768, 12, 12, 2048),  # 390 MB of float32 weights streamed per token, 12 layers
    "d2048": (2048, 6, 16, 5632),  # 1.37 GB in 6 layers: per-layer Python overhead weighs less
}


def decode_speed(rows: list, shape: str) -> None:
    from scratchlm.infer.generate import Sampling, generate
    from scratchlm.model import ModelConfig, TransformerLM
    from scratchlm.model.layers import set_decode_weights

    torch.manual_seed(0)
    d_model, n_layers, n_heads, d_ff = SHAPES[shape]
    config = ModelConfig(vocab_size=16384, context_length=256, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                         d_ff=d_ff)  # fmt: skip
    model = TransformerLM(config).eval()
    streamed = sum(p.numel() for name, p in model.named_parameters() if "token_embeddings" not in name)
    prompt = torch.randint(0, config.vocab_size, (PROMPT_TOKENS,)).tolist()
    tokenizer, greedy = IdTokenizer(config.vocab_size, prompt), Sampling(temperature=0, max_new_tokens=NEW_TOKENS)
    peak = bandwidth()
    times: dict[str, list[float]] = {"float32": [], "bfloat16": [], "int8": []}
    for _ in range(3):
        for kind in times:
            set_decode_weights(model, kind)
            generate(model, tokenizer, ["p"], Sampling(temperature=0, max_new_tokens=2))  # builds the decode weights
            _, stats = generate(model, tokenizer, ["p"], greedy)
            times[kind].append(1 / stats.decode_tokens_per_s)
    base = 1 / statistics.median(times["float32"])
    for kind, per_byte in (("float32", 4), ("bfloat16", 2), ("int8", 1)):
        tps = 1 / statistics.median(times[kind])
        mbu = streamed * per_byte * tps / peak
        mb = streamed * per_byte / 1e6
        rows.append([shape, kind, f"{mb:,.0f}", f"{tps:,.1f}", f"{mbu:.0%}", f"{tps / base:.2f}x"])
    print(f"bandwidth ({'copy_'} of 512 MB, read + write): {peak / 1e9:.1f} GB/s")


@torch.no_grad()
def bits_per_byte(run: Path, n_tokens: int) -> list:
    from scratchlm.infer import load_run
    from scratchlm.model.layers import set_decode_weights

    model, tokenizer, config, _ = load_run(run, "cpu")
    model.eval()
    tokens = torch.from_numpy(
        np.array(np.memmap(config.data.val_tokens, dtype=np.uint16, mode="r")[: n_tokens + 1]).astype(np.int64)
    )
    ctx = model.config.context_length
    targets = tokens[1:]
    n_bytes = sum(len(tokenizer.vocab[int(t)]) for t in targets)
    out = []
    for kind in ("float32", "bfloat16", "int8"):
        set_decode_weights(model, kind)
        nats = 0.0
        for start in range(0, n_tokens, ctx):
            chunk = tokens[start : min(start + ctx, n_tokens) + 1]
            caches = model.new_caches(1)
            for t in range(len(chunk) - 1):  # one position a step: the decoding path
                logits = model(chunk[t : t + 1].view(1, 1), torch.tensor([t]), caches)[0, -1]
                nats += float(torch.logsumexp(logits, 0) - logits[chunk[t + 1]])
        out.append(nats / math.log(2) / n_bytes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--shapes", default="d768,d2048", help=f"comma-separated, of {', '.join(SHAPES)}")
    args = parser.parse_args()
    print(f"machine: {machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    from scratchlm.model import kernels

    print(
        f"int8 kernel: {kernels._quant.PATH if kernels.HAVE_C_INT8 else 'PyTorch (no C extension)'}, "
        f"bf16 kernel: {kernels._quant.BF16_PATH if kernels.HAVE_C_INT8 else 'PyTorch'}"
    )
    rows: list = []
    for shape in args.shapes.split(","):
        decode_speed(rows, shape)
    print(table(["model", "weights", "MB read / token", "tok/s (batch 1)", "MBU", "vs float32"], rows))
    if (args.run / "config.toml").is_file():
        fp32, bf16, int8 = bits_per_byte(args.run, args.eval_tokens)
        print(f"\n{args.run}: {args.eval_tokens} validation tokens decoded one a step")
        rows = [["float32", f"{fp32:.4f}", ""]]
        rows += [[kind, f"{bpb:.4f}", f"{bpb / fp32 - 1:+.2%}"] for kind, bpb in (("bfloat16", bf16), ("int8", int8))]
        print(table(["weights", "bits/byte", "vs float32"], rows))
    else:
        print(f"\n(no run at {args.run}: bits per byte skipped; give --run)")


if __name__ == "__main__":
    main()
