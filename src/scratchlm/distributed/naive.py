"""Naive DDP: broadcast the parameters at the start, then all-reduce every gradient, one at a time,
after backward."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from scratchlm.distributed.base import Strategy, broadcast_parameters


class NaiveDDP(Strategy):
    name = "naive"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        broadcast_parameters(model)

    def finish_gradients(self) -> None:
        for p in self.trained_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world
