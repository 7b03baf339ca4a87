"""Flat DDP: every gradient copied into one buffer, one all-reduce, copied back: one collective's
latency instead of one per parameter."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from scratchlm.distributed.base import Strategy, broadcast_parameters


class FlatDDP(Strategy):
    name = "flat"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        broadcast_parameters(model)

    def finish_gradients(self) -> None:
        grads = [p.grad for p in self.trained_parameters() if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads,
                                                                         strict=True)])  # fmt: skip
