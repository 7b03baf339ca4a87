"""Evaluate a run directory's latest checkpoint on its validation set."""

from __future__ import annotations

import os
from pathlib import Path

from scratchlm.data.loader import resolve_device
from scratchlm.errors import ScratchLMError
from scratchlm.train.checkpoint import latest_checkpoint, load_checkpoint
from scratchlm.train.config import load_config
from scratchlm.train.trainer import build_model, evaluate, load_data, restore, setup_cpu, token_byte_lengths


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
    state = load_checkpoint(checkpoint, map_location=device)
    restore(model, state, checkpoint, config)
    result = evaluate(model, val_tokens, token_byte_lengths(tokenizer, config.model.vocab_size, device), config, device)
    return {"step": state["step"], **vars(result)}
