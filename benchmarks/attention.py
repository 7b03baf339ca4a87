"""Causal self-attention on CPU, forward + backward: scratchlm's C kernel (`kernels.causal_self_attention`,
RoPE inside) against PyTorch's `F.scaled_dot_product_attention` (flash attention on CPU) after our RoPE,
both from the same fused q|k|v projection output, to the gradient of that output.

    python benchmarks/attention.py [--repeats 30] [--threads 2]

The shapes are the throughput benchmark's tiny and small attention, then longer sequences up to past
`kernels.ATTENTION_MAX_SEQ`, where the model goes back to PyTorch's attention. Rounds alternate between
the two and the median counts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table

from scratchlm.model import kernels
from scratchlm.model.layers import RotaryEmbedding

# (batch, heads, seq, d_head)
SHAPES = [(16, 4, 128, 32), (8, 16, 256, 32), (4, 8, 512, 64), (2, 8, 1024, 64), (1, 8, 2048, 64)]


def torch_attention(qkv, heads: int, rope: RotaryEmbedding):
    batch, seq, width = qkv.shape
    d = width // (3 * heads)
    q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in qkv.split(heads * d, dim=-1))
    positions = torch.arange(seq)
    q, k = rope(q, positions), rope(k, positions)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, heads * d)


def ours(qkv, heads: int, rope: RotaryEmbedding):
    return kernels.causal_self_attention(qkv, heads, heads, rope.rotations[: qkv.shape[1]])


def time_step(fn, qkv, grad_out) -> float:
    qkv.grad = None
    start = time.perf_counter()
    fn(qkv).backward(grad_out)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not kernels.HAVE_C_ATTENTION:
        sys.exit("the C extension is not built (no compiler at install)")
    torch.set_num_threads(args.threads)
    rows = []
    for batch, heads, seq, d in SHAPES:
        rope = RotaryEmbedding(d, seq)
        qkv = torch.randn(batch, seq, 3 * heads * d, requires_grad=True)
        grad_out = torch.randn(batch, seq, heads * d)
        runs = {"ours": lambda t, r=rope, h=heads: ours(t, h, r)}
        runs["torch"] = lambda t, r=rope, h=heads: torch_attention(t, h, r)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(3):  # warm-up
            for fn in runs.values():
                time_step(fn, qkv, grad_out)
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(time_step(fn, qkv, grad_out))
        ours_ms, torch_ms = (statistics.median(times[n]) * 1e3 for n in ("ours", "torch"))
        used = "yes" if seq <= kernels.ATTENTION_MAX_SEQ else "no (PyTorch's)"
        speedup = f"{torch_ms / ours_ms:.2f}"
        rows.append([f"{batch} x {heads} x {seq} x {d}", f"{ours_ms:.2f}", f"{torch_ms:.2f}", speedup, used])
    print(f"machine: {machine()}, torch {torch.__version__}, {args.threads} threads; median of {args.repeats} rounds")
    print(table(["batch x heads x seq x d_head", "ours ms", "torch SDPA ms", "speedup", "model uses ours"], rows))


if __name__ == "__main__":
    main()
