"""Bucketed DDP: the parameters in reverse order (the order backward produces their gradients) grouped
into buckets of about `bucket_mb`; each bucket is all-reduced, flattened, asynchronously as soon as its
last gradient is ready, so communication overlaps backward with a few large messages, not many small
ones."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from scratchlm.distributed.base import Replicated, flatten, unflatten_into


def make_buckets(params: list[nn.Parameter], bucket_mb: float) -> list[list[nn.Parameter]]:
    """Consecutive parameters, a bucket closing before it would pass `bucket_mb` MiB (a parameter
    larger than that is a bucket of its own)."""
    limit, buckets, size = bucket_mb * 2**20, [], 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if buckets and size + nbytes <= limit:
            buckets[-1].append(p)
            size += nbytes
        else:
            buckets.append([p])
            size = nbytes
    return buckets


class BucketedDDP(Replicated):
    name = "bucketed"

    def __init__(self, model: nn.Module, bucket_mb: float = 25.0) -> None:
        super().__init__(model)
        self.buckets = make_buckets(list(reversed(self.trained_parameters())), bucket_mb)
        self._bucket_of = {p: i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._ready: list[set[nn.Parameter]] = [set() for _ in self.buckets]
        self._launched: list[tuple[int, dist.Work, torch.Tensor, list[torch.Tensor]]] = []
        self._syncing = True
        for p in self.trained_parameters():
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _grad_ready(self, p: nn.Parameter) -> None:
        if not self._syncing:
            return
        index = self._bucket_of[p]
        self._ready[index].add(p)
        if len(self._ready[index]) == len(self.buckets[index]):
            self._launch(index)

    def _launch(self, index: int) -> None:
        grads = [p.grad for p in self.buckets[index] if p.grad is not None]
        flat = flatten(grads)
        self._launched.append((index, dist.all_reduce(flat, async_op=True), flat, grads))

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self._syncing = last
        yield

    def finish_gradients(self) -> None:
        done = {index for index, *_ in self._launched}
        for index in range(len(self.buckets)):  # buckets holding a parameter that got no gradient
            if index not in done:
                self._launch(index)
        for _, work, flat, grads in self._launched:
            work.wait()
            unflatten_into(flat / self.world, grads)
        self._launched.clear()
        self._ready = [set() for _ in self.buckets]
        self._syncing = True
