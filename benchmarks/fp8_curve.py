"""FP8 training against bf16 on the same steps: the loss curves and tokens/s side by side.

    python benchmarks/fp8_curve.py --data data/corpora-4k [--shape gpt2] [--steps 300] [--plot fp8.png]

Each precision trains the same model (same seed, same initial weights) on the same batches of real
text, with the same AdamW and warm-up: bf16 autocast alone ("bf16"), then the blocks' matmuls in
float8 with one scale per tensor ("fp8 tensorwise": e4m3 forward, e5m2 gradients) and with a scale per
row ("fp8 rowwise"), as `scratchlm train --set fp8=...` runs them (`scratchlm.kernels.fp8`). Rounds are
timed after the first 10 steps (compilation, when --compile). The table gives the mean training loss
over windows of steps and the fp8 - bf16 gap; the plot the curves.

On a CPU the "bf16" run is float32 and fp8 runs through PyTorch's software `_scaled_mm`: a check that
the curves agree at a small shape (--shape tiny), not a speed figure. FP8's speed needs an H100-class GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table
from train_throughput import SHAPES

PRECISIONS = ("bf16", "fp8 tensorwise", "fp8 rowwise")


def batches(tokens: np.ndarray, batch: int, context: int, steps: int, seed: int, device) -> list:
    """The same (x, y) windows for every precision, drawn once."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        starts = rng.integers(0, len(tokens) - context - 1, batch)
        window = torch.from_numpy(np.stack([tokens[s : s + context + 1] for s in starts]).astype(np.int64))
        out.append((window[:, :-1].to(device), window[:, 1:].to(device)))
    return out


def run(precision: str, shape: dict, data: list, args, device) -> tuple[list[float], float]:
    """(the loss at every step, tokens/s after the first 10 steps)."""
    from scratchlm.kernels.fp8 import convert_to_fp8
    from scratchlm.model import ModelConfig, TransformerLM
    from scratchlm.optim import AdamW

    torch.manual_seed(args.seed)
    model = TransformerLM(ModelConfig(**{k: v for k, v in shape.items() if k != "batch"})).to(device)
    if precision != "bf16":
        convert_to_fp8(model, precision.removeprefix("fp8 "))
    opt = AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    loss_fn = torch.compile(model.loss) if args.compile else model.loss
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    losses, start = [], None
    for step, (x, y) in enumerate(data):
        if step == 10:
            sync()
            start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        with autocast:
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync()
    seconds = time.perf_counter() - start if start is not None else float("nan")
    return [float(v) for v in losses], x.numel() * (len(data) - 10) / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="a prepared data directory (train.bin)")
    parser.add_argument("--shape", choices=list(SHAPES), default="gpt2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--plot", help="write the curves here (PNG)")
    args = parser.parse_args()
    from scratchlm.data.encode import load_tokens

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SHAPES[args.shape]
    tokens, meta = load_tokens(Path(args.data) / "train.bin")
    if meta.get("vocab_size", 0) > shape["vocab_size"]:
        sys.exit(f"{args.data}: a vocabulary of {meta['vocab_size']} does not fit shape {args.shape}")
    data = batches(tokens, shape["batch"], shape["context_length"], args.steps, args.seed, device)
    curves, speed = {}, {}
    for precision in args.precisions:
        curves[precision], speed[precision] = run(precision, shape, data, args, device)
        print(f"{precision}: final loss {curves[precision][-1]:.4f}, {speed[precision]:,.0f} tok/s", flush=True)

    if device.type != "cuda" and "bf16" in curves:  # autocast is CUDA's: the baseline ran in float32 here
        curves = {("float32" if p == "bf16" else p): v for p, v in curves.items()}
        speed = {("float32" if p == "bf16" else p): v for p, v in speed.items()}
    base = "bf16" if "bf16" in curves else "float32" if "float32" in curves else None
    window = max(1, args.steps // 10)
    rows = []
    for start in range(0, args.steps, window):
        means = {p: float(np.mean(curves[p][start : start + window])) for p in curves}
        gaps = [f"{means[p] - means[base]:+.4f}" for p in curves if base and p != base]
        rows.append([f"{start + 1}-{min(start + window, args.steps)}", *(f"{means[p]:.4f}" for p in curves), *gaps])
    others = [p for p in curves if p != base] if base else []
    headers = ["steps", *curves, *(f"{p} - {base}" for p in others)]
    rows.append(
        ["tokens/s", *(f"{speed[p]:,.0f}" for p in curves), *(f"{speed[p] / speed[base]:.2f}x" for p in others)]
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    print(f"\n{args.shape} shape, {args.steps} steps, lr {args.lr}, on {name}, torch {torch.__version__}"
          f"{', compiled' if args.compile else ''}\n")  # fmt: skip
    print(table(headers, rows))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for precision, losses in curves.items():
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(window, len(losses) + 1), smooth, label=precision)
        ax.set(xlabel="step", ylabel=f"training loss (mean of {window} steps)", title=f"{args.shape}: fp8 vs bf16")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
