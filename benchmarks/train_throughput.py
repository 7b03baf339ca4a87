"""Training throughput: scratchlm TransformerLM + our AdamW vs Hugging Face `LlamaForCausalLM` +
`torch.optim.AdamW`, same shape, same batch, one full step (forward, backward, optimizer) each.

    python benchmarks/train_throughput.py [--steps 20] [--repeats 3] [--shapes tiny small] [--compile]
                                          [--allocator default|reuse|both]
    python benchmarks/train_throughput.py --device cuda [--dtype bfloat16|float32] [--shapes gpu gpt2] [--compile]

--compile runs scratchlm's loss through `torch.compile` (the trainer's `compile = "yes"`); the peer stays
eager, as `transformers` users run it. Compilation happens in the warm-up, outside the timed rounds.

Both run in this process with the same threads and the same memory allocator; rounds alternate (ours,
peer, ours, peer, ...) and the median round counts, so machine noise hits both alike. The allocator
matters to both: glibc as it comes hands large freed blocks back to the OS, so every step faults its
activations in again page by page; `scratchlm train` keeps freed memory for reuse instead
(`keep_freed_memory`). `--allocator both` (the default) measures every shape with glibc's default, then
everything again with reuse, for both models.
MFU = tokens/s x FLOPs per token / peak, with FLOPs per token = 6 x matmul parameters (LM head
included) + 12 x layers x d_model x context (`scratchlm.accounting.training_flops_per_token`) and the
peak measured here: the best fp32 FLOP/s of a 2048 x 2048 matmul at the same thread count, over
1-second measurements before every round (on a shared VM a single measurement at a busy moment reads
low and makes every MFU read high).
Targets (issue 3): tiny >= 1.2x the peer and MFU >= 55%; small >= 1.05x and MFU >= 80%.

On CUDA both models run under bf16 autocast (`--dtype bfloat16`, what `scratchlm train` does there) or in
float32, the clock is read after synchronizing, and MFU is against the GPU's datasheet peak for that
dtype (`scratchlm.accounting.PEAK_FLOPS`: dense bf16, or fp32 without TF32). The allocator phases are
CPU-only. The `gpu` shape is the speedrun's gpu preset, `gpt2` a GPT-2-small-sized model.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table

SHAPES = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, d_ff=384, context_length=128, vocab_size=10_000, batch=16),
    "small": dict(d_model=512, n_layers=4, n_heads=16, d_ff=1344, context_length=256, vocab_size=10_000, batch=8),
    "gpu": dict(d_model=512, n_layers=8, n_heads=8, d_ff=1344, context_length=512, vocab_size=10_000, batch=64),
    "gpt2": dict(d_model=768, n_layers=12, n_heads=12, d_ff=2048, context_length=1024, vocab_size=50_304, batch=16),
}


def ours(shape: dict, compile: bool, device: torch.device):
    from scratchlm.model import ModelConfig, TransformerLM
    from scratchlm.optim import AdamW

    config = ModelConfig(**{k: v for k, v in shape.items() if k != "batch"})
    model = TransformerLM(config).to(device)
    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    loss_fn = torch.compile(model.loss) if compile else model.loss

    def step(x, y):
        loss = loss_fn(x, y)  # fused, chunked LM head + cross-entropy
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def peer(shape: dict, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["d_model"], intermediate_size=shape["d_ff"],
        num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_heads"], max_position_embeddings=shape["context_length"],
        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    def step(x, y):
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def tokens_per_second(step, x, y, steps: int, dtype: str) -> float:
    autocast = x.is_cuda and dtype == "bfloat16"
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        for _ in range(steps):
            step(x, y)
    sync()
    return x.numel() * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="default: tiny small on CPU, all on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile scratchlm's loss")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="CUDA: autocast or not")
    parser.add_argument(
        "--allocator", choices=["default", "reuse", "both"], default="both",
        help="glibc as it comes, freed memory kept for reuse (what `scratchlm train` sets), or both in turn",
    )  # fmt: skip
    args = parser.parse_args()
    args.shapes = args.shapes or (list(SHAPES) if args.device == "cuda" else ["tiny", "small"])
    if args.device == "cuda":
        return main_cuda(args)

    from scratchlm.accounting import measure_cpu_matmul_peak
    from scratchlm.train.setup import keep_freed_memory

    peaks = [measure_cpu_matmul_peak(seconds=2.0)]
    measured = []  # (name, allocator, config, params, scratchlm tok/s, peer tok/s)
    for allocator in ["default", "reuse"] if args.allocator == "both" else [args.allocator]:
        if allocator == "reuse":  # for the rest of the process: glibc has no way back to its default
            keep_freed_memory()
        for name in args.shapes:
            label = name + (" (compiled)" if args.compile else "")
            measured.append((label, allocator, *measure(SHAPES[name], args, torch.device("cpu"), peaks)))
            print(table(HEADERS, [row(*measured[-1], max(peaks))]).splitlines()[-1], flush=True)  # MFU so far
    print(f"\nmachine: {machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"fp32 matmul peak (2048^2, best of {len(peaks)} measurements): {max(peaks) / 1e9:.1f} GFLOP/s\n")
    print(table(HEADERS, [row(*m, max(peaks)) for m in measured]))


def main_cuda(args) -> None:
    from scratchlm.accounting import device_peak_flops

    device = torch.device("cuda")
    peak = device_peak_flops(device, "bf16" if args.dtype == "bfloat16" else "fp32")
    measured = []
    for name in args.shapes:
        label = name + (" (compiled)" if args.compile else "")
        measured.append((label, args.dtype, *measure(SHAPES[name], args, device)))
        print(table(HEADERS, [row(*measured[-1], peak)]).splitlines()[-1], flush=True)
    print(f"\ndevice: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, {args.dtype}")
    print(f"peak (datasheet, dense {args.dtype}): {peak / 1e12:.0f} TFLOP/s\n")
    print(table(HEADERS, [row(*m, peak) for m in measured]).replace("| allocator |", "| dtype     |"))


def measure(shape: dict, args, device: torch.device, peaks: list[float] | None = None) -> tuple:
    """(config, parameters, scratchlm tok/s, peer tok/s): medians over alternating rounds. On CPU,
    appends a peak measurement before every round to `peaks`."""
    from scratchlm.accounting import measure_cpu_matmul_peak
    from scratchlm.model import ModelConfig

    config = ModelConfig(**{k: v for k, v in shape.items() if k != "batch"})
    torch.manual_seed(0)
    x = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["context_length"]), device=device)
    y = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["context_length"]), device=device)
    runs = {"scratchlm": ours(shape, args.compile, device), "transformers": peer(shape, device)}
    our_params = sum(p.numel() for p in runs["scratchlm"][0].parameters())
    peer_params = sum(p.numel() for p in runs["transformers"][0].parameters())
    assert our_params == peer_params, f"shapes differ: {our_params} vs {peer_params} parameters"
    for _, step in runs.values():
        tokens_per_second(step, x, y, 3, args.dtype)  # warm-up (and compilation)
    results = {k: [] for k in runs}
    for _ in range(args.repeats):
        if peaks is not None:
            peaks.append(measure_cpu_matmul_peak(seconds=1.0))
        for key, (_, step) in runs.items():
            results[key].append(tokens_per_second(step, x, y, args.steps, args.dtype))
    return config, our_params, *(statistics.median(results[k]) for k in runs)


def row(name: str, allocator: str, config, params: int, ours_tps: float, peer_tps: float, peak: float) -> list[str]:
    from scratchlm.accounting import matmul_parameters, training_flops_per_token

    flops = training_flops_per_token(config)
    return [
        name, allocator, f"{params / 1e6:.2f}M", f"{matmul_parameters(config) / 1e6:.2f}M", f"{flops / 1e6:.1f}",
        f"{ours_tps:,.0f}", f"{peer_tps:,.0f}", f"{ours_tps / peer_tps:.2f}",
        f"{ours_tps * flops / peak:.1%}", f"{peer_tps * flops / peak:.1%}",
    ]  # fmt: skip


HEADERS = ["shape", "allocator", "params", "matmul params", "MFLOP/token", "scratchlm tok/s", "HF Llama tok/s", "ratio",
           "scratchlm MFU", "HF MFU"]  # fmt: skip

if __name__ == "__main__":
    main()
