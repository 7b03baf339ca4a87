"""Overlapped DDP: an asynchronous all-reduce launched from each parameter's post-accumulate-grad hook,
while backward is still computing the gradients of earlier layers; `finish_gradients` waits for all."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist
from torch import nn

from scratchlm.distributed.base import Replicated


class OverlappedDDP(Replicated):
    name = "overlapped"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._syncing = True  # off during the micro-batches before the last: their gradients only accumulate
        self._pending: list[tuple[dist.Work, nn.Parameter]] = []
        for p in self.trained_parameters():
            p.register_post_accumulate_grad_hook(self._launch)

    def _launch(self, p: nn.Parameter) -> None:
        if self._syncing:
            self._pending.append((dist.all_reduce(p.grad, async_op=True), p))

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self._syncing = last
        yield

    def finish_gradients(self) -> None:
        for work, p in self._pending:
            work.wait()
            p.grad /= self.world
        self._pending.clear()
        self._syncing = True
