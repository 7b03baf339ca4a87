"""Resource accounting: FLOPs per token, device peak FLOP/s and MFU.

FLOPs count 2 per multiply-add (2*m*n*p for an (m x n) @ (n x p) matmul). Training one token costs
6 x (matmul parameters) for the weights (forward 2, backward 4) plus 12 x layers x d_model x context
for the attention scores and weighted sums (forward 2 x 2 x context x d_model per layer, backward twice
that) — counting the full causal square, as is the convention (PaLM, nanoGPT).
"""

from __future__ import annotations

import json
import os
import time

import torch

from scratchlm.model.transformer import ModelConfig

# Peak dense FLOP/s (no sparsity) by device name fragment; the local CPU is measured instead.
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}


def matmul_parameters(config: ModelConfig) -> int:
    """Parameters used in matmuls: attention and FFN projections of every layer, and the LM head."""
    d, kv = config.d_model, config.n_kv_heads * config.d_head
    attention = d * d * 2 + d * kv * 2
    ffn = (3 if config.ffn == "swiglu" else 2) * d * config.d_ff
    return config.n_layers * (attention + ffn) + config.vocab_size * d


def training_flops_per_token(config: ModelConfig) -> float:
    """6 x matmul parameters + 12 x layers x d_model x context (forward + backward, one token)."""
    return 6 * matmul_parameters(config) + 12 * config.n_layers * config.d_model * config.context_length


def measure_cpu_matmul_peak(threads: int | None = None, size: int = 2048, seconds: float = 1.0) -> float:
    """fp32 FLOP/s of a large square matmul on this CPU (the best of a few timed rounds)."""
    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def cpu_peak_flops() -> float:
    """The local CPU's fp32 matmul peak at the current thread count, measured once and cached."""
    from scratchlm.data.sources import cache_dir

    threads = torch.get_num_threads()
    path = cache_dir() / "cpu_peak.json"
    key = f"{os.uname().machine}-{os.cpu_count()}cpu-{threads}threads-torch{torch.__version__}"
    try:
        cached = json.loads(path.read_text())
        if key in cached:
            return cached[key]
    except (OSError, ValueError):
        cached = {}
    peak = measure_cpu_matmul_peak()
    cached[key] = peak
    try:
        from scratchlm.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(cached, indent=1))
    except OSError:
        pass
    return peak


def device_peak_flops(device: torch.device, dtype: str = "fp32") -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peaks in PEAK_FLOPS.items():
            if fragment in name:
                return peaks[dtype]
        return float("nan")
    if device.type == "cpu":
        return cpu_peak_flops()
    return float("nan")
