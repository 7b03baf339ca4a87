"""Causal self-attention, forward + backward.

    python benchmarks/attention.py [--repeats 30] [--threads 2]     # CPU
    python benchmarks/attention.py --gpu [--dtype bf16]              # CUDA (needs Triton)

CPU: scratchlm's C kernel (`kernels.causal_self_attention`, RoPE inside) and our FlashAttention-2 in
PyTorch (`kernels.flash_attention`, after our RoPE) against PyTorch's `F.scaled_dot_product_attention`
(flash attention on CPU) after our RoPE, all from the same fused q|k|v projection output, to the
gradient of that output. The shapes are the throughput benchmark's tiny and small attention, then
longer sequences up to past `kernels.ATTENTION_MAX_SEQ`, where the model goes back to PyTorch's
attention. Rounds alternate between the candidates and the median counts.

GPU: batch 1, 16 heads, d_head 64, causal, sequence lengths 128 ... 16,384, timed with
`triton.testing.do_bench`: our Triton FlashAttention-2 against naive PyTorch attention (the scores
materialised) and SDPA, forward, backward and both.
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

from scratchlm.kernels.flash_attention import flash_attention
from scratchlm.model import kernels
from scratchlm.model.layers import RotaryEmbedding, scaled_dot_product_attention

# (batch, heads, seq, d_head)
SHAPES = [(16, 4, 128, 32), (8, 16, 256, 32), (4, 8, 512, 64), (2, 8, 1024, 64), (1, 8, 2048, 64)]


def torch_attention(qkv, heads: int, rope: RotaryEmbedding, attend=None):
    """RoPE, then `attend(q, k, v)` (default SDPA, causal) on (b, h, s, d): (b, s, 3 h d) -> (b, s, h d)."""
    batch, seq, width = qkv.shape
    d = width // (3 * heads)
    q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in qkv.split(heads * d, dim=-1))
    positions = torch.arange(seq, device=qkv.device)
    q, k = rope(q, positions), rope(k, positions)
    out = (attend or sdpa)(q, k, v)
    return out.transpose(1, 2).reshape(batch, seq, heads * d)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def naive(q, k, v):
    n = q.shape[-2]
    return scaled_dot_product_attention(q, k, v, torch.ones(n, n, dtype=torch.bool, device=q.device).tril())


def ours(qkv, heads: int, rope: RotaryEmbedding):
    return kernels.causal_self_attention(qkv, heads, heads, rope.rotations[: qkv.shape[1]])


def time_step(fn, qkv, grad_out) -> float:
    qkv.grad = None
    start = time.perf_counter()
    fn(qkv).backward(grad_out)
    return time.perf_counter() - start


def cpu_table(args) -> None:
    if not kernels.HAVE_C_ATTENTION:
        sys.exit("the C extension is not built (no compiler at install)")
    torch.set_num_threads(args.threads)
    rows = []
    for batch, heads, seq, d in SHAPES:
        rope = RotaryEmbedding(d, seq)
        qkv = torch.randn(batch, seq, 3 * heads * d, requires_grad=True)
        grad_out = torch.randn(batch, seq, heads * d)
        runs = {
            "ours": lambda t, r=rope, h=heads: ours(t, h, r),
            "fa2": lambda t, r=rope, h=heads: torch_attention(t, h, r, lambda q, k, v: flash_attention(q, k, v, True)),
            "torch": lambda t, r=rope, h=heads: torch_attention(t, h, r),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(3):  # warm-up (and the FA2 backward's compilation)
            for fn in runs.values():
                time_step(fn, qkv, grad_out)
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(time_step(fn, qkv, grad_out))
        ours_ms, fa2_ms, torch_ms = (statistics.median(times[n]) * 1e3 for n in ("ours", "fa2", "torch"))
        used = "yes" if seq <= kernels.ATTENTION_MAX_SEQ else "no (PyTorch's)"
        rows.append([f"{batch} x {heads} x {seq} x {d}", f"{ours_ms:.2f}", f"{fa2_ms:.2f}", f"{torch_ms:.2f}",
                     f"{torch_ms / ours_ms:.2f}", f"{torch_ms / fa2_ms:.2f}", used])  # fmt: skip
    print(f"machine: {machine()}, torch {torch.__version__}, {args.threads} threads; median of {args.repeats} rounds")
    print(table(["batch x heads x seq x d_head", "C kernel ms", "PyTorch FA2 ms", "SDPA ms", "SDPA / C",
                 "SDPA / FA2", "model uses C"], rows))  # fmt: skip


def gpu_times(fn, q, k, v, grad) -> tuple[float, float, float]:
    """Milliseconds (triton.testing.do_bench, median) of fn's forward, its backward, and both."""
    import triton.testing

    out = fn(q, k, v)
    forward = triton.testing.do_bench(lambda: fn(q, k, v))
    backward = triton.testing.do_bench(lambda: out.backward(grad, retain_graph=True))
    both = triton.testing.do_bench(lambda: fn(q, k, v).backward(grad))
    return forward, backward, both


def gpu_table(args) -> None:
    import triton.testing

    from scratchlm.kernels.flash_triton import triton_flash_attention

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    candidates = {"triton FA2": lambda q, k, v: triton_flash_attention(q, k, v, True), "SDPA": sdpa, "naive": naive}
    rows = []
    for seq in [2**p for p in range(7, 15)]:
        q, k, v = (torch.randn(1, 16, seq, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)
        row = [str(seq)]
        for name, fn in candidates.items():
            if name == "naive" and seq > 8192:  # (16 x seq x seq) scores in fp32: 17 GB at 16,384, and minutes
                row += ["-", "-", "-"]
                continue
            row += [f"{ms:.3f}" for ms in gpu_times(fn, q, k, v, grad)]
        rows.append(row)
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}, "
          "batch 1, 16 heads, d_head 64, causal; ms by triton.testing.do_bench (median)")  # fmt: skip
    header = ["seq"] + [f"{name} {part}" for name in candidates for part in ("fwd", "bwd", "fwd+bwd")]
    print(table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="the GPU table (CUDA and Triton)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="GPU only")
    args = parser.parse_args()
    gpu_table(args) if args.gpu else cpu_table(args)


if __name__ == "__main__":
    main()
