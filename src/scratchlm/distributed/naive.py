"""Naive DDP: broadcast the parameters at the start, then all-reduce every gradient, one at a time,
after backward."""

from __future__ import annotations

import torch.distributed as dist

from scratchlm.distributed.base import Replicated


class NaiveDDP(Replicated):
    name = "naive"

    def finish_gradients(self) -> None:
        for p in self.trained_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world
