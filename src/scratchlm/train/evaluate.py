"""Evaluation: loss, perplexity and bits per byte on the fixed validation windows, for a model in
training or for a run directory's latest checkpoint."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from scratchlm.data.loader import eval_windows, resolve_device
from scratchlm.errors import ScratchLMError
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.checkpoint import latest_checkpoint, read_checkpoint
from scratchlm.train.config import TrainConfig, load_config
from scratchlm.train.setup import autocast, build_model, load_data, restore, setup_cpu


@dataclass
class EvalResult:
    loss: float  # mean nats per token
    perplexity: float
    bits_per_byte: float
    tokens: int


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int, device) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (special tokens: 0), for bits per byte."""
    lengths = torch.zeros(vocab_size, dtype=torch.int64)  # integers: exact sums on any device (MPS has no float64)
    for token_id, token in tokenizer.vocab.items():
        if token_id < vocab_size and token_id not in tokenizer.special_ids.values():
            lengths[token_id] = len(token)
    return lengths.to(device)


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, byte_lengths: torch.Tensor, config: TrainConfig, device,
             strategy=None) -> EvalResult:  # fmt: skip
    """Loss, perplexity and bits per byte on the fixed validation windows. With a data-parallel
    `strategy` the ranks share the batches and all-reduce the sums; a sharded one (FSDP) has every rank
    run every batch, as its forward passes are collective."""
    device = torch.device(device)
    loss_fn = strategy.loss if strategy is not None else model.loss
    world = strategy.world if strategy is not None and not strategy.sharded else 1
    rank = dist.get_rank() if world > 1 else 0
    was_training = model.training
    model.eval()
    total_nats, total_bytes, total_tokens = 0.0, 0.0, 0
    ctx = config.model.context_length
    for i, (x, y) in enumerate(eval_windows(tokens, config.batch_size, ctx, config.eval_tokens, device)):
        if i % world != rank:
            continue
        with autocast(config, device):
            mean_loss = loss_fn(x, y)  # bits per byte needs only the sum of the token losses
        total_nats += mean_loss.item() * y.numel()
        total_bytes += byte_lengths[y].sum().item()
        total_tokens += y.numel()
    model.train(was_training)
    if world > 1:
        totals = torch.tensor([total_nats, total_bytes, total_tokens], dtype=torch.float64)
        dist.all_reduce(totals)
        total_nats, total_bytes, total_tokens = totals[0].item(), totals[1].item(), int(totals[2].item())
    loss = total_nats / total_tokens
    return EvalResult(loss, math.exp(loss), total_nats / (math.log(2) * max(total_bytes, 1)), total_tokens)


def evaluate_run(run_dir: str | os.PathLike, overrides: list[str] = ()) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ScratchLMError(f"{run_dir} is not a run directory: config.toml is missing")
    config = load_config(run_dir / "config.toml", list(overrides))
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ScratchLMError(f"{run_dir} has no checkpoint yet")
    setup_cpu(config)
    device = resolve_device(config.device)
    _, val_tokens, tokenizer = load_data(config)
    model = build_model(config, device)
    state = read_checkpoint(checkpoint, map_location=device)
    restore(model, state, checkpoint, config)
    result = evaluate(model, val_tokens, token_byte_lengths(tokenizer, config.model.vocab_size, device), config, device)
    return {"step": state["step"], **vars(result)}
