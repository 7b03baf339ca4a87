"""Checkpoints of a run with several processes, through `torch.distributed.checkpoint` (DCP).

`checkpoints/step_<step>/` is a DCP directory: each rank writes the tensors it holds (a shard of a
sharded weight or optimizer state as a DTensor; a replicated tensor is written once, by one rank), DCP's
coordinator writes `.metadata` after every rank has finished, and rank 0 adds `run.pt` (the step, the
data position, the RNG states, the optimizer's hyperparameters). The directory is written under a
temporary name and renamed into place, and `latest` names it only after that: a crash mid-save leaves the
previous checkpoint the latest.

Keys: `model.<name>` for the model's state dict and `optim.<parameter name>.<state key>` for the
optimizer's per-parameter tensors, so a checkpoint is independent of the world size and of how the
optimizer numbers its parameters. `read_sharded_checkpoint` reads one back whole, in the format of a
single-process checkpoint, and any strategy (or one process) takes its part of it from there.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from scratchlm.atomic import atomic_directory, atomic_open
from scratchlm.errors import ScratchLMError
from scratchlm.train.checkpoint import latest_checkpoint, point_latest_at

RUN_STATE = "run.pt"


def _owned(path: Path) -> list[str]:
    """The entries of an existing checkpoint directory that a save of the same step replaces."""
    if not path.is_dir():
        return []
    return [p.name for p in path.iterdir() if p.name in (".metadata", RUN_STATE) or p.name.endswith(".distcp")]


def save_sharded_checkpoint(run_dir: str | os.PathLike, step: int, strategy, optimizer, run_state: dict,
                            keep: int = 2) -> Path:  # fmt: skip
    """Write `checkpoints/step_<step>/` from every rank (collective), point `latest` at it and keep the
    newest `keep` checkpoints. run_state: what a checkpoint holds besides the model and the optimizer
    (rank 0's is written)."""
    is_main = dist.get_rank() == 0
    directory = Path(run_dir) / "checkpoints"
    path = directory / f"step_{step:07d}"
    tensors, values = strategy.sharded_state(optimizer)
    every: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(every, values)  # non-tensor per-parameter state (a step count), from its owners
    names = {id(p): name for name, p in strategy.model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    groups, start = [], 0
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": list(range(start, start + len(group["params"])))})  # fmt: skip
        start += len(group["params"])
    try:
        with atomic_directory(path, _owned(path)) if is_main else contextlib.nullcontext() as tmp:
            box = [str(tmp) if is_main else None]
            dist.broadcast_object_list(box, src=0)  # every rank writes into rank 0's temporary directory
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(box[0]))
            if is_main:
                values = {k: v for shard in every for k, v in shard.items()}
                with atomic_open(Path(box[0]) / RUN_STATE) as f:
                    torch.save({**run_state, "param_names": [names[id(p)] for p in params], "param_groups": groups,
                                "optimizer_values": values}, f)  # fmt: skip
        if is_main:
            point_latest_at(path, keep)
    except (OSError, RuntimeError, CheckpointException) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
        previous = latest_checkpoint(run_dir)
        raise ScratchLMError(
            f"could not write checkpoint {path}: {reason}; the latest checkpoint is still "
            f"{previous.name if previous else 'none'}"
        ) from None
    dist.barrier()  # no rank goes on before the checkpoint is the latest
    return path


def read_sharded_checkpoint(path: Path, map_location="cpu") -> dict:
    """A DCP checkpoint directory whole, as `read_checkpoint` returns a single-process one: {"model":
    state dict, "optimizer": the optimizer's state dict, "step", ...}. Read without collectives."""
    run_file = path / RUN_STATE
    if not run_file.is_file() or not (path / ".metadata").is_file():
        missing = RUN_STATE if not run_file.is_file() else ".metadata"
        raise ScratchLMError(f"{path}: not a complete scratchlm checkpoint ({missing} is missing)")
    try:
        run_state = torch.load(run_file, map_location=map_location, weights_only=True)
        metadata = dcp.FileSystemReader(path).read_metadata()
        entries = metadata.state_dict_metadata.items()
        tensors = {key: torch.empty(m.size, dtype=m.properties.dtype)
                   for key, m in entries if isinstance(m, TensorStorageMetadata)}  # fmt: skip
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    except Exception as exc:  # a truncated or foreign directory: say which and why
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ScratchLMError(f"{path}: not a readable scratchlm checkpoint ({type(exc).__name__}: {reason})") from None
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    model = {key.removeprefix("model."): v for key, v in tensors.items() if key.startswith("model.")}
    state = {}
    for index, name in enumerate(run_state.pop("param_names")):
        prefix = f"optim.{name}."
        entries = {
            k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix) :]
        }
        entries.update(run_state["optimizer_values"].get(name, {}))
        if entries:
            state[index] = entries
    optimizer = {"state": state, "param_groups": run_state.pop("param_groups")}
    del run_state["optimizer_values"]
    return {**run_state, "model": model, "optimizer": optimizer}
