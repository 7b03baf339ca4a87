"""Checkpoints: everything needed to continue a run exactly, written atomically, loaded safely.

A checkpoint holds the model and optimizer state, the step, the RNG states (torch's and the batch
sampler's: the data position) and the number of steps the run will take. `checkpoints/latest` names
the newest one and is replaced only after that file is complete. Loading uses
`torch.load(weights_only=True)`: a checkpoint can hold tensors and plain data, never code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from scratchlm.atomic import atomic_open, atomic_write_text
from scratchlm.errors import ScratchLMError


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict, keep: int = 2) -> Path:
    """Write `checkpoints/step_<step>.pt`, point `latest` at it, keep the newest `keep` files."""
    directory = Path(run_dir) / "checkpoints"
    path = directory / f"step_{step:07d}.pt"
    with atomic_open(path) as f:
        torch.save(state, f)
    atomic_write_text(directory / "latest", path.name + "\n")
    for old in sorted(directory.glob("step_*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_file():
        raise ScratchLMError(f"{pointer} names {path.name}, which is missing")
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ScratchLMError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # a truncated or foreign file: say which and why
        raise ScratchLMError(f"{path}: not a readable scratchlm checkpoint ({type(exc).__name__}: {exc})") from None
