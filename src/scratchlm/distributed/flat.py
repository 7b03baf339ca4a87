"""Flat DDP: every gradient copied into one buffer, one all-reduce, copied back: one collective's
latency instead of one per parameter."""

from __future__ import annotations

import torch.distributed as dist

from scratchlm.distributed.base import Replicated, flatten, unflatten_into


class FlatDDP(Replicated):
    name = "flat"

    def finish_gradients(self) -> None:
        grads = [p.grad for p in self.trained_parameters() if p.grad is not None]
        flat = flatten(grads)
        dist.all_reduce(flat)
        unflatten_into(flat / self.world, grads)
