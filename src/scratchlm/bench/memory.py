"""Where a training step's memory goes, measured: the bytes saved for backward by kind (saved-tensor
hooks, each tensor attributed to the innermost module that saved it), beside the accounting's
prediction; on CUDA also the peak allocated memory and a memory snapshot for pytorch.org/memory_viz.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from scratchlm.model.layers import CausalSelfAttention, Dropout, Embedding, RMSNorm, SwiGLU, UngatedFFN
from scratchlm.model.transformer import TransformerBlock

KINDS = (
    "norms", "attention", "feed-forward", "checkpointed block inputs", "lm head + loss", "embeddings", "dropout masks"
)  # fmt: skip
_KIND_OF = {
    RMSNorm: "norms",
    CausalSelfAttention: "attention",
    SwiGLU: "feed-forward",
    UngatedFFN: "feed-forward",
    TransformerBlock: "checkpointed block inputs",  # a block saves nothing itself but a checkpoint's inputs
    Embedding: "embeddings",
    Dropout: "dropout masks",
}


@contextlib.contextmanager
def _innermost_module(model: nn.Module) -> Iterator[list[str]]:
    """A stack of the kinds of the modules whose forward is running (top: the innermost known one)."""
    stack = ["lm head + loss"]  # outside every block and norm: the head and the loss
    handles = []
    for module in model.modules():
        kind = _KIND_OF.get(type(module))
        if kind is None:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a, kind=kind: stack.append(kind)))
        handles.append(module.register_forward_hook(lambda m, a, o: stack.pop() and None))  # None: keep the output
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def saved_for_backward(model: nn.Module, token_ids: Tensor, targets: Tensor) -> dict[str, int]:
    """Bytes of the distinct storages saved for backward by one `model.loss(token_ids, targets)`, by
    kind (`KINDS`), parameters excluded; a storage saved twice counts once, for the first saver. Then
    runs backward (and leaves the gradients in the parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[str, int]] = {}
    with _innermost_module(model) as stack:

        def pack(t: Tensor) -> Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params and storage.data_ptr() not in seen:
                seen[storage.data_ptr()] = (stack[-1], storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model.loss(token_ids, targets)
    loss.backward()
    by_kind = dict.fromkeys(KINDS, 0)
    for kind, nbytes in seen.values():
        by_kind[kind] += nbytes
    return by_kind


def cuda_peak_and_snapshot(step, snapshot: Path | None) -> int:
    """Run `step()` once on CUDA with the allocator's history recorded; write the snapshot (a pickle for
    https://pytorch.org/memory_viz) to `snapshot` if given. Returns the peak allocated bytes."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        step()
        torch.cuda.synchronize()
        if snapshot is not None:
            from scratchlm.atomic import atomic_write_bytes

            atomic_write_bytes(snapshot, pickle.dumps(torch.cuda.memory._snapshot()))
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return torch.cuda.max_memory_allocated()
