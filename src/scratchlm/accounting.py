"""Resource accounting: parameters, FLOPs, memory and time of a model configuration — predicted
before any compute is spent, and checked against measurements (tests; `scratchlm account`).

FLOPs count 2 per multiply-add: an (m x n) @ (n x p) matmul costs 2*m*n*p. A forward pass is the
matmuls of the projections, the feed-forward, the LM head, and attention's score (Q K^T) and weighted
sum (A V) matmuls over the full seq x seq square (what PyTorch's FlopCounterMode counts, and the
PaLM/nanoGPT MFU convention). Backward costs twice the forward. The 6 N T rule of thumb (N = matmul
parameters, T = tokens) leaves out attention; the exact count shows where it stops being close (long
contexts). Embedding lookups, norms, softmax and activations cost no matmul FLOPs and are left out.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scratchlm.errors import ScratchLMError
from scratchlm.model import kernels
from scratchlm.model.config import MODEL_PRESETS, ModelConfig

# Dense peak FLOP/s (no sparsity) by device; the local CPU is measured instead (`cpu_peak_flops`).
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}

PRESETS = MODEL_PRESETS  # the named shapes `scratchlm account --preset` takes


# ----------------------------------------------------------------------------------------- parameters
def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters by component; equals the model's `numel()` sum (tested)."""
    d, kv, layers = config.d_model, config.n_kv_heads * config.d_head, config.n_layers
    ffn_matrices = 3 if config.ffn == "swiglu" else 2
    counts = {
        "embeddings": config.vocab_size * d,
        "attention": layers * (2 * d * d + 2 * d * kv),
        "feed-forward": layers * ffn_matrices * d * config.d_ff,
        "norms": (2 * layers + 1) * d,
        "lm head": 0 if config.tie_embeddings else config.vocab_size * d,
    }
    if config.value_embeddings:
        counts["value embeddings"] = layers * config.vocab_size * kv
    if config.unet_skips:
        counts["skip weights"] = layers // 2
    counts["total"] = sum(counts.values())
    return counts


def matmul_parameters(config: ModelConfig) -> int:
    """Parameters used in matmuls: attention and FFN projections of every layer, and the LM head."""
    counts = parameter_counts(config)
    return counts["attention"] + counts["feed-forward"] + config.vocab_size * config.d_model


# ----------------------------------------------------------------------------------------- FLOPs
def forward_flops(config: ModelConfig, batch: int, seq: int) -> dict[str, int]:
    """FLOPs of one forward pass by component (2 per multiply-add)."""
    d, kv, layers, tokens = config.d_model, config.n_kv_heads * config.d_head, config.n_layers, batch * seq
    ffn_matrices = 3 if config.ffn == "swiglu" else 2
    flops = {
        "attention projections": layers * 2 * tokens * d * (2 * d + 2 * kv),
        "attention scores + weighted sum": layers * 2 * 2 * batch * seq * seq * d,
        "feed-forward": layers * 2 * tokens * d * config.d_ff * ffn_matrices,
        "lm head": 2 * tokens * d * config.vocab_size,
    }
    flops["total"] = sum(flops.values())
    return flops


def training_flops(config: ModelConfig, batch: int, seq: int) -> dict[str, float]:
    """One training step (forward + backward = 3 x forward) beside the 6 N T rule of thumb."""
    forward = forward_flops(config, batch, seq)["total"]
    rule = 6 * matmul_parameters(config) * batch * seq
    return {
        "forward": forward,
        "backward": 2 * forward,
        "step": 3 * forward,
        "6NT": rule,
        "6NT / exact": rule / (3 * forward),
    }


def training_flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token at the full context (the MFU numerator the trainer uses)."""
    return training_flops(config, 1, config.context_length)["step"] / config.context_length


# ----------------------------------------------------------------------------------------- memory
@dataclass
class MemoryEstimate:
    """Bytes for training. activations: saved for backward after the forward; recompute: the most that
    activation checkpointing adds during backward (one checkpointed block's activations at a time)."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    recompute: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.recompute


def uses_c_attention(config: ModelConfig, seq: int, device: str = "cpu", precision: str = "fp32") -> bool:
    """Whether training takes the C attention kernel (`kernels.causal_self_attention`): on CPU in float32,
    without dropout, at a shape `kernels.attention_kernel_fits` (and batches of at least MERGE_MIN_ROWS
    tokens, as training batches are)."""
    fits = kernels.attention_kernel_fits(config.d_head, seq)
    return device == "cpu" and precision == "fp32" and not config.dropout and fits


def _layer_elements(config: ModelConfig, tokens: int, seq: int, c_attention: bool) -> dict[str, int]:
    """What one block that is not checkpointed saves for backward, by kind (see `activation_elements`)."""
    d, kv, ff, h = config.d_model, config.n_kv_heads * config.d_head, config.d_ff, config.n_heads
    attention_per_token = d + 2 * d + 2 * kv + h + (0 if c_attention else d + kv)
    attention_fixed = (d + 2 * kv) * d + (0 if c_attention else 2 * seq * config.d_head)
    return {
        "norms": 2 * (d + 1) * tokens,
        "attention": attention_per_token * tokens + attention_fixed,
        "feed-forward": (d + (3 * ff if config.ffn == "swiglu" else 2 * ff)) * tokens,
    }


def activation_elements(
    config: ModelConfig, batch: int, seq: int, device: str = "cpu", precision: str = "fp32"
) -> dict[str, int]:
    """Elements of the tensors the fused training path saves for backward, by kind (measured op by op
    with saved-tensor hooks, `scratchlm.bench.memory`, and checked within 15% by the tests).

    Per block and token: the two RMSNorms, input and 1/rms each (2 d + 2); attention: its input (the
    norm's output), the q|k|v projection output, the output and its log-sum-exp per head
    (3 d + 2 kv + heads), and with PyTorch's attention (not `uses_c_attention`) also q and k after RoPE
    (d + kv); the FFN: its input, gate and up (the SwiGLU activation's inputs) and the gated product
    (d + 3 d_ff; d + 2 d_ff for the plain SiLU FFN). Per block, whatever the batch: the concatenated
    q|k|v weights, and PyTorch's attention the RoPE rotations. A checkpointed block keeps only its
    input (d per token). Then the final norm (d + 1 per token) and the fused head's gradients (d per
    token + vocab x d).
    """
    d, tokens = config.d_model, batch * seq
    kept = config.n_layers - config.checkpointed_layers
    layer = _layer_elements(config, tokens, seq, uses_c_attention(config, seq, device, precision))
    return {
        "norms": kept * layer["norms"] + (d + 1) * tokens,
        "attention": kept * layer["attention"],
        "feed-forward": kept * layer["feed-forward"],
        "checkpointed block inputs": config.checkpointed_layers * d * tokens,
        "lm head + loss": d * tokens + config.vocab_size * d,
    }


def recompute_elements(config: ModelConfig, batch: int, seq: int, device: str = "cpu", precision: str = "fp32") -> int:
    """With activation checkpointing, the elements one checkpointed block holds while it is recomputed
    in backward (one at a time); 0 without."""
    if not config.checkpointed_layers:
        return 0
    c_attention = uses_c_attention(config, seq, device, precision)
    return sum(_layer_elements(config, batch * seq, seq, c_attention).values())


def dropout_mask_bytes(config: ModelConfig, batch: int, seq: int) -> int:
    """With dropout, one byte per element kept for backward where it applies outside attention: the
    embeddings and each block's two residual branches (not for checkpointed blocks, which draw their
    masks again). Attention-weight dropout keeps no mask in the flash kernels (CUDA: they regenerate it
    from the RNG seed); PyTorch's CPU attention with dropout falls back to its math path, which keeps
    (heads x seq x seq) weights per layer, not counted here."""
    kept = config.n_layers - config.checkpointed_layers
    return (2 * kept + 1) * batch * seq * config.d_model if config.dropout else 0


def optimizer_state_elements(config: ModelConfig, optimizer: str = "adamw") -> int:
    """Elements of optimizer state, as `scratchlm train` builds each optimizer: AdamW keeps two moments
    a parameter; Muon one momentum per block matrix and AdamW's two moments for the rest (embeddings,
    head, gains); RMSProp and AdaGrad one (the squares); SGD none (it runs without momentum)."""
    counts = parameter_counts(config)
    if optimizer == "muon":
        block_matrices = counts["attention"] + counts["feed-forward"]
        return block_matrices + 2 * (counts["total"] - block_matrices)
    return {"adamw": 2, "rmsprop": 1, "adagrad": 1, "sgd": 0}[optimizer] * counts["total"]


def memory_estimate(
    config: ModelConfig, batch: int, seq: int, precision: str = "fp32", device: str = "cpu", optimizer: str = "adamw"
) -> MemoryEstimate:
    """Bytes for training with `optimizer` on a device of this type ("cpu", "cuda", ...). precision "fp32",
    or "bf16-mixed": fp32 master weights, gradients and optimizer state, bf16 activations (autocast)."""
    n = parameter_counts(config)["total"]
    width = 4 if precision == "fp32" else 2
    act_elements = sum(activation_elements(config, batch, seq, device, precision).values())
    act_bytes = act_elements * width + dropout_mask_bytes(config, batch, seq)
    recompute = recompute_elements(config, batch, seq, device, precision) * width
    return MemoryEstimate(4 * n, 4 * n, 4 * optimizer_state_elements(config, optimizer), act_bytes, recompute)


def largest_batch(
    config: ModelConfig,
    seq: int,
    memory_bytes: float,
    precision: str = "fp32",
    device: str = "cpu",
    optimizer: str = "adamw",
) -> int:
    """The largest batch whose predicted training memory fits in `memory_bytes` (0 if none)."""
    fixed = memory_estimate(config, 0, seq, precision, device, optimizer).total
    per_sample = memory_estimate(config, 1, seq, precision, device, optimizer).total - fixed
    return max(0, int((memory_bytes - fixed) // per_sample)) if per_sample > 0 else 0


# ----------------------------------------------------------------------------------------- devices, time
def measure_cpu_matmul_peak(threads: int | None = None, size: int = 2048, seconds: float = 1.0) -> float:
    """fp32 FLOP/s of a square matmul on this CPU: the best single product over `seconds` of rounds
    (the best, not the mean, so a busy moment lowers the figure as little as possible)."""
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


def robust_cpu_peak() -> float:
    """The best of several measurements at two sizes, spread over ~4 s."""
    return max(measure_cpu_matmul_peak(size=size, seconds=1.0) for size in (1024, 2048, 1024, 2048))


def cpu_peak_floor(threads: int) -> float | None:
    """FLOP/s below which a measured fp32 matmul peak cannot be this CPU's peak: `threads` cores (at
    most the CPUs there are) at the nominal clock, one fp32 FMA per cycle on every lane of the widest
    vector unit (AVX-512: 16 lanes, AVX2: 8), i.e. a single FMA unit. Every x86 CPU with these vector
    units has at least one (most have two), and the measured matmul reaches it unless the machine is
    busy. None where /proc/cpuinfo says too little (not Linux, not x86)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)
    flags = re.search(r"^flags\s*:(.*)$", info, re.M)
    if not mhz or not flags:
        return None
    flags = set(flags.group(1).split())
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else None
    if lanes is None:
        return None
    return min(threads, os.cpu_count() or 1) * float(mhz.group(1)) * 1e6 * lanes * 2


def _cpu_peak_store() -> tuple[Path, str, dict]:
    from scratchlm.data.sources import cache_dir

    path = cache_dir() / "cpu_peak.json"
    # v4: peaks recorded before it may hold a run's throughput over-read across a checkpoint (fixed)
    key = f"{os.uname().machine}-{os.cpu_count()}cpu-{torch.get_num_threads()}threads-torch{torch.__version__}-v4"
    try:
        cached = json.loads(path.read_text())
        cached = cached if isinstance(cached, dict) else {}
    except (OSError, ValueError):
        cached = {}
    return path, key, cached


def record_cpu_peak(flops: float) -> float:
    """Keep `flops` as this machine's CPU peak if it beats the best so far; returns the best. A peak is
    never lowered: a measurement taken at a busy moment reads low, and would make every MFU read high."""
    from scratchlm.atomic import atomic_write_text

    path, key, cached = _cpu_peak_store()
    best = cached.get(key)
    best = best if isinstance(best, float) else 0.0
    if flops > best:
        cached[key] = best = flops
        with contextlib.suppress(OSError, ScratchLMError):  # an unwritable cache only costs a re-measure
            atomic_write_text(path, json.dumps(cached, indent=1))
    return best


def cpu_peak_flops(remeasure: bool = False) -> float:
    """The local CPU's fp32 matmul peak at the current thread count: the best ever measured on this
    machine (cached), measured on first use and again with `remeasure`. A measurement below
    `cpu_peak_floor` is taken at a busy moment: it is repeated (up to 3 times) and warned about."""
    _, key, cached = _cpu_peak_store()
    best = cached.get(key)
    if isinstance(best, float) and not remeasure:
        return best
    floor = cpu_peak_floor(torch.get_num_threads())
    measured = 0.0
    for attempt in range(3):
        measured = max(measured, robust_cpu_peak())
        if floor is None or measured >= floor:
            break
        print(
            f"warning: the CPU's matmul peak measured {measured / 1e9:,.1f} GFLOP/s, below the "
            f"{floor / 1e9:,.1f} GFLOP/s its cores, clock and vector units guarantee: the machine is busy"
            + ("; measuring again" if attempt < 2 else "; MFU may read high until it is measured on an idle machine"),
            file=sys.stderr,
        )
    return record_cpu_peak(measured)


def device_peak_flops(device: torch.device | str, dtype: str = "fp32") -> float:
    """Peak FLOP/s of a device: the table for known GPUs, a measurement for the local CPU."""
    name = device if isinstance(device, str) else device.type
    if name == "cpu":
        return cpu_peak_flops()
    if isinstance(device, torch.device) and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    for fragment, peaks in PEAK_FLOPS.items():
        if fragment.lower() in name.lower():
            return peaks[dtype]
    return float("nan")


def training_time_s(config: ModelConfig, tokens: float, peak_flops: float, mfu: float) -> float:
    """Seconds to train on `tokens` tokens at the given peak FLOP/s and MFU."""
    return tokens * training_flops_per_token(config) / (peak_flops * mfu)
