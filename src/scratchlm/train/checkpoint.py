"""Checkpoints: everything needed to continue a run exactly, written atomically, loaded safely.

A run's checkpoint holds the model and optimizer state, the step, the RNG states (torch's and the batch
sampler's: the data position), the schedule's position and the number of steps the run will take.
`checkpoints/latest` names the newest one and is replaced only after that file is complete.
`save_checkpoint` / `load_checkpoint` are the course's interface for a model and optimizer alone. Loading uses
`torch.load(weights_only=True)`: a checkpoint can hold tensors and plain data, never code.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import BinaryIO

import torch

from scratchlm.atomic import atomic_open, atomic_write_text
from scratchlm.errors import ScratchLMError

PathOrFile = str | os.PathLike | BinaryIO

# Fields a run may change between a checkpoint and its continuation (the weights and the optimizer's
# state still fit): how it runs (kernels, dropout, the context it trains or evaluates at) and, of the
# optimizer, everything but which optimizer it is.
FREE_TO_CHANGE = {
    "model": ("fused_kernels", "dropout", "context_length"),
    "optim": ("lr", "min_lr", "warmup_steps", "betas", "eps", "weight_decay", "grad_clip"),
}


def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int, out: PathOrFile) -> None:
    """Save the model's and the optimizer's state and the iteration to `out`, a path (written
    atomically) or a binary file object: the course's checkpoint interface."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": iteration}
    if isinstance(out, str | os.PathLike):
        with atomic_open(out) as f:
            torch.save(state, f)
    else:
        torch.save(state, out)


def load_checkpoint(src: PathOrFile, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Restore what `save_checkpoint` saved (from a path or a binary file object) into `model` and
    `optimizer`; returns the iteration. Loads with `weights_only=True`: never runs code."""
    state = read_checkpoint(src)
    load_state(state, model, optimizer, _name(src))
    return state["step"]


def load_state(state: dict, model: torch.nn.Module, optimizer, where: str, strategy=None) -> None:
    """Put a checkpoint's model (and optimizer) state in place, or say in one line why it does not fit.
    strategy: a distributed strategy, which puts the whole state where its shards live."""
    try:
        if strategy is not None:
            strategy.load_full_state(state["model"], state["optimizer"] if optimizer is not None else None, optimizer)
            return
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ScratchLMError(f"{where} does not fit this model: {reason}") from None


def save_run_checkpoint(run_dir: str | os.PathLike, step: int, state: dict, keep: int = 2) -> Path:
    """Write `checkpoints/step_<step>.pt`, point `latest` at it, keep the newest `keep` checkpoints.

    A failed write (a full disk) raises a clear error and leaves the previous checkpoint the latest."""
    directory = Path(run_dir) / "checkpoints"
    path = directory / f"step_{step:07d}.pt"
    try:
        with atomic_open(path) as f:
            torch.save(state, f)
        point_latest_at(path, keep)
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        if "enforce fail" in reason or "file write failed" in reason:  # torch's zip writer hides the errno
            usage = shutil.disk_usage(directory)
            full = usage.free < max(2**20, usage.total // 100)
            reason = f"the write failed{': the disk is full' if full else ''} ({usage.free / 2**20:,.1f} MiB free)"
        previous = latest_checkpoint(run_dir)
        raise ScratchLMError(
            f"could not write checkpoint {path}: {reason}; the latest checkpoint is still "
            f"{previous.name if previous else 'none'}"
        ) from None
    return path


def point_latest_at(path: Path, keep: int = 2) -> None:
    """Name the complete checkpoint `path` in `checkpoints/latest`; remove all but the newest `keep`
    checkpoints (files of one process, directories of several)."""
    atomic_write_text(path.parent / "latest", path.name + "\n")
    for old in sorted(path.parent.glob("step_*"), key=lambda p: p.name.removesuffix(".pt"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `checkpoints/latest` names, or None for a run without one."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not name:
        raise ScratchLMError(f"{pointer} is empty: expected the name of a checkpoint file such as step_0000100.pt")
    path = pointer.parent / name
    if "/" in name or not path.exists():
        raise ScratchLMError(f"{pointer} names {name!r}, which is not a checkpoint in {pointer.parent}")
    return path


def read_checkpoint(src: PathOrFile, map_location="cpu") -> dict:
    """A checkpoint's state dict, from a path or a binary file object (`weights_only=True`); a
    directory is a checkpoint of several processes (`scratchlm.distributed.checkpoint`), read whole."""
    if isinstance(src, str | os.PathLike) and Path(src).is_dir():
        from scratchlm.distributed.checkpoint import read_sharded_checkpoint

        return read_sharded_checkpoint(Path(src), map_location)
    try:
        state = torch.load(src, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ScratchLMError(f"checkpoint not found: {src}") from None
    except Exception as exc:  # a truncated or foreign file: say which and why
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise ScratchLMError(
            f"{_name(src)}: not a readable scratchlm checkpoint ({type(exc).__name__}: {reason})"
        ) from None
    missing = [key for key in ("model", "step") if not isinstance(state, dict) or key not in state]
    if missing:
        raise ScratchLMError(f"{_name(src)}: not a scratchlm checkpoint (no {missing[0]!r} entry)")
    return state


def _name(src: PathOrFile) -> str:
    return str(src) if isinstance(src, str | os.PathLike) else getattr(src, "name", "the checkpoint file")


def check_compatible(state: dict, config, path: Path, fields: tuple[str, ...] = ("model",)) -> None:
    """Raise, naming each difference, unless the checkpoint was made with the same `fields` of the
    config (the model's shape; for resuming training, also the optimizer) as `config` has."""
    from scratchlm.train.config import load_config_text

    if not state.get("config"):
        return  # nothing recorded to compare with; load_state_dict still checks the shapes
    saved = load_config_text(state["config"], f"{path} (its config)")
    differences = []
    for section in fields:
        ours, theirs = getattr(config, section), getattr(saved, section)
        for f in dataclasses.fields(ours):
            if f.name in FREE_TO_CHANGE.get(section, ()):
                continue
            if getattr(ours, f.name) != getattr(theirs, f.name):
                differences.append(
                    f"{section}.{f.name} is {getattr(theirs, f.name)!r} there, {getattr(ours, f.name)!r} here"
                )
    if differences:
        raise ScratchLMError(
            f"{path} does not fit this config: {'; '.join(differences)} "
            "(use the run's own config, or start over with --fresh)"
        )
