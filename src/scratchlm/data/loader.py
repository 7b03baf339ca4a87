"""Batches of (x, y) windows from a memory-mapped token array.

Training draws random windows (y is x shifted by one token) from a seeded generator, so the batch
sequence is a pure function of the seed and the number of batches drawn: saving the generator's
state in a checkpoint resumes the exact same data stream. Evaluation walks fixed windows in order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from scratchlm.errors import ScratchLMError


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else must exist on this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ScratchLMError(f"unknown device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ScratchLMError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ScratchLMError(f"device {name!r} requested but MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ScratchLMError(f"unsupported device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    return device


class BatchSampler:
    """Random training windows. tokens: 1-D array (e.g. np.memmap of uint16).

    With several processes (rank of world), every rank draws the same global batch of
    batch_size x world windows from the same generator and takes its own slice: the ranks' batches are
    disjoint parts of one deterministic stream, and their union is what one process would draw with a
    batch world times as large."""

    def __init__(self, tokens: np.ndarray, batch_size: int, context_length: int, seed: int, device,
                 rank: int = 0, world: int = 1) -> None:  # fmt: skip
        if len(tokens) < context_length + 1:
            raise ScratchLMError(
                f"the token array holds {len(tokens)} tokens: too few for one window of {context_length} + 1"
            )
        self.tokens, self.batch_size, self.context_length = tokens, batch_size, context_length
        self.rank, self.world = rank, world
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = np.arange(context_length + 1)

    def next(self) -> tuple[Tensor, Tensor]:
        """x, y: (batch_size, context_length) int64, y[:, t] = x[:, t + 1] in the token stream."""
        high, size = len(self.tokens) - self.context_length, self.batch_size * self.world
        starts = torch.randint(0, high, (size,), generator=self.generator)[self.rank * self.batch_size :][
            : self.batch_size
        ]
        windows = torch.from_numpy(self.tokens[starts.numpy()[:, None] + self._offsets].astype(np.int64))
        if self.device.type == "cuda":
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        else:
            windows = windows.to(self.device)
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def eval_windows(
    tokens: np.ndarray, batch_size: int, context_length: int, max_tokens: int, device
) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive non-overlapping windows from the start of `tokens`, covering up to `max_tokens`
    targets: the same fixed validation set every time."""
    n_windows = min((len(tokens) - 1) // context_length, max(1, max_tokens // context_length))
    for first in range(0, n_windows, batch_size):
        idx = np.arange(first, min(first + batch_size, n_windows))[:, None] * context_length
        windows = torch.from_numpy(tokens[idx + np.arange(context_length + 1)].astype(np.int64)).to(device)
        yield windows[:, :-1], windows[:, 1:]
