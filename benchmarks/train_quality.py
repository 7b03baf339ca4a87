"""Quality in fixed time: validation bits per byte after N minutes of training on this machine,
scratchlm (`scratchlm train`, the real path) vs Hugging Face `LlamaForCausalLM` + `torch.optim.AdamW`
at the same shape, with the same tokenizer, data, batch, schedule, clipping and evaluation.

    python benchmarks/train_quality.py --config configs/shakespeare-cpu.toml [--minutes 10]

Prepare the data first (`scratchlm data prepare`). Each side gets `--minutes` of training steps
(the step count is fitted to the budget from the speed of its first steps, as the trainer does) and
evaluates once, at the end, outside the budget. Targets (issue 3): scratchlm <= 2.0 bits/byte (goal
1.8), and below the peer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table


class LlamaAdapter(torch.nn.Module):
    """HF Llama behind our model interface: forward(x) -> logits, loss(x, y)."""

    def __init__(self, model_config) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        super().__init__()
        c = model_config
        self.model = LlamaForCausalLM(LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
            num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
            max_position_embeddings=c.context_length, rope_theta=c.rope_theta, rms_norm_eps=1e-5,
            tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False, attn_implementation="sdpa",
        ))  # fmt: skip

    def forward(self, x):
        return self.model(input_ids=x).logits

    def loss(self, x, y):
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())


def train_peer(config, minutes: float) -> dict:
    """The trainer's loop, minus checkpoints and logs, around the peer model and torch's AdamW."""
    from scratchlm.data.loader import BatchSampler
    from scratchlm.optim import clip_grad_norm, cosine_lr
    from scratchlm.train.budget import BUDGET_PROBE_STEPS
    from scratchlm.train.evaluate import evaluate, token_byte_lengths
    from scratchlm.train.setup import load_data, setup_cpu

    setup_cpu(config)
    train_tokens, val_tokens, tokenizer = load_data(config)
    torch.manual_seed(config.seed)
    model = LlamaAdapter(config.model)
    o = config.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=o.lr, betas=o.betas, eps=o.eps)  # fmt: skip
    sampler = BatchSampler(train_tokens, config.batch_size, config.model.context_length, config.seed + 1, "cpu")
    total, step, start = config.max_steps, 0, time.perf_counter()
    while step < total:
        lr = cosine_lr(step, o.lr, o.min_lr, o.warmup_steps, total)
        for group in opt.param_groups:
            group["lr"] = lr
        for _ in range(config.grad_accum_steps):
            x, y = sampler.next()
            (model.loss(x, y) / config.grad_accum_steps).backward()
        clip_grad_norm(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step == BUDGET_PROBE_STEPS:
            total = max(step + 1, min(config.max_steps, int(minutes * 60 / ((time.perf_counter() - start) / step))))
    seconds = time.perf_counter() - start
    result = evaluate(model, val_tokens, token_byte_lengths(tokenizer, config.model.vocab_size, "cpu"), config, "cpu")
    return {"steps": step, "seconds": seconds, "bpb": result.bits_per_byte, "loss": result.loss}


def train_ours(config, minutes: float) -> dict:
    from scratchlm.train.trainer import train

    config.max_minutes = minutes
    # Like the peer's loop: no evaluation or checkpoint before the end, so both spend the budget on steps
    # (with them, 10 evaluations and checkpoints took ~35 s of scratchlm's 10 minutes).
    config.eval_every = config.checkpoint_every = config.max_steps
    start = time.perf_counter()
    result = train(config, fresh=True)
    return {"steps": result["step"], "seconds": time.perf_counter() - start, "bpb": result["val/bpb"],
            "loss": result["val/loss"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/shakespeare-cpu.toml")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--only", choices=["scratchlm", "peer"], help="run one side (e.g. to redo it)")
    args = parser.parse_args()

    from scratchlm.train.config import load_config

    config = load_config(args.config, [*args.set, "max_steps=1000000"])
    config.out_dir = str(Path(config.out_dir).with_name(Path(config.out_dir).name + "-quality-bench"))
    results = {}
    if args.only != "peer":
        results["scratchlm"] = train_ours(config, args.minutes)
    if args.only != "scratchlm":
        peer_config = load_config(args.config, [*args.set, "max_steps=1000000"])
        results["HF Llama + torch AdamW"] = train_peer(peer_config, args.minutes)
    rows = [
        [name, r["steps"], f"{r['seconds']:.0f}", f"{r['loss']:.4f}", f"{r['bpb']:.4f}"] for name, r in results.items()
    ]
    threads = torch.get_num_threads()
    print(f"\nmachine: {machine()}, {threads} threads; config {args.config}, {args.minutes:g} minutes each")
    print("(seconds: training only for the peer; scratchlm's include its final evaluation and checkpoint)\n")
    print(table(["model", "steps", "seconds", "val loss (nats/token)", "val bits/byte"], rows))


if __name__ == "__main__":
    main()
