"""An imported model as a run directory: `config.toml` (the model's shape in a TrainConfig),
`tokenizer/`, `checkpoints/step_0000000.pt` and `imported.json` (where it came from), written as a unit
so that an interrupted import leaves nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from scratchlm.atomic import atomic_directory, atomic_write_text
from scratchlm.errors import ScratchLMError
from scratchlm.model.config import ModelConfig
from scratchlm.model.transformer import TransformerLM
from scratchlm.tokenizer.bpe import Tokenizer

RUN_FILES = ("config.toml", "tokenizer", "checkpoints", "imported.json")


def read_source(source: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, str]:
    """(config, state, tokenizer, format) of "smollm2", a `.gguf` file or a Hugging Face directory."""
    from scratchlm.pretrained.from_gguf import read_gguf
    from scratchlm.pretrained.from_huggingface import read_huggingface
    from scratchlm.pretrained.smollm2 import smollm2_gguf

    if str(source) == "smollm2":
        return (*read_gguf(smollm2_gguf()), "gguf")
    path = Path(source)
    if path.is_dir():
        return (*read_huggingface(path), "huggingface")
    if path.suffix == ".gguf" or path.is_file():
        return (*read_gguf(path), "gguf")
    raise ScratchLMError(f"{source}: expected smollm2, a .gguf file or a Hugging Face model directory")


def build(config: ModelConfig, state: dict[str, torch.Tensor], where: str) -> TransformerLM:
    """The model with the imported weights (every tensor present and of its shape, or an error)."""
    model = TransformerLM(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ScratchLMError(f"{where}: the weights do not fit the model its metadata describes ({exc})") from None
    return model.eval()


def write_run(out: str | os.PathLike, source: str, kind: str, model: TransformerLM, tokenizer: Tokenizer) -> Path:
    """Write the run directory `out` (new, or one this command wrote before)."""
    from scratchlm.train.config import DataConfig, TrainConfig, to_toml

    out = Path(out).resolve()
    if len(tokenizer.vocab) > model.config.vocab_size:
        raise ScratchLMError(
            f"{source}: the tokenizer has {len(tokenizer.vocab)} tokens, the model {model.config.vocab_size} rows"
        )
    data = DataConfig(
        train_tokens=str(out / "train.bin"), val_tokens=str(out / "val.bin"), tokenizer=str(out / "tokenizer")
    )
    config = TrainConfig(model=model.config, data=data, out_dir=str(out))
    with atomic_directory(out, RUN_FILES) as tmp:
        tokenizer.save(tmp / "tokenizer")
        atomic_write_text(tmp / "config.toml", to_toml(config))
        (tmp / "checkpoints").mkdir()
        torch.save(
            {"model": model.state_dict(), "step": 0, "config": to_toml(config)}, tmp / "checkpoints" / "step_0000000.pt"
        )
        atomic_write_text(tmp / "checkpoints" / "latest", "step_0000000.pt\n")
        atomic_write_text(tmp / "imported.json", json.dumps({"source": str(source), "format": kind}, indent=1) + "\n")
    return out
