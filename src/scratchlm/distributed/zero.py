"""ZeRO stage 1: the optimizer state sharded over the ranks.

`ShardedOptimizer` wraps any optimizer class (ours or torch's): each rank owns about 1/N of the
parameters (balanced by size, largest first), keeps optimizer state for those alone, steps only those
and then broadcasts each to the others. Gradients still arrive whole on every rank (the `zero1`
strategy all-reduces them in buckets, as `bucketed` does), so only the state is sharded: with AdamW,
8 bytes a parameter become 8 / N.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from scratchlm.distributed.bucketed import BucketedDDP


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """The rank that owns each parameter: the largest first, each to the least-loaded rank."""
    load, owners = [0] * world, [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owners[index] = min(range(world), key=lambda r: (load[r], r))
        load[owners[index]] += sizes[index]
    return owners


class ShardedOptimizer(torch.optim.Optimizer):
    """optimizer_cls(params, **kwargs) over this rank's share of `params` (a list of parameters or of
    param-group dicts). `param_groups` are the full groups (set the lr there, as with any optimizer)."""

    def __init__(self, params: Iterable, optimizer_cls: type[torch.optim.Optimizer], **kwargs: Any) -> None:
        super().__init__(params, kwargs)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.all_params = [p for group in self.param_groups for p in group["params"]]
        self.owners = assign_owners([p.numel() for p in self.all_params], self.world)
        mine = {p for p, owner in zip(self.all_params, self.owners, strict=True) if owner == self.rank}
        self._local_groups = []  # (index of the full group, its share here)
        shares = []
        for index, group in enumerate(self.param_groups):
            share = [p for p in group["params"] if p in mine]
            if share:
                self._local_groups.append(index)
                shares.append({**{k: v for k, v in group.items() if k != "params"}, "params": share})
        self.local = optimizer_cls(shares, **kwargs) if shares else None

    @torch.no_grad()
    def step(self, closure=None):
        if self.local is not None:
            for local_group, index in zip(self.local.param_groups, self._local_groups, strict=True):
                local_group.update({k: v for k, v in self.param_groups[index].items() if k != "params"})
            self.local.step()
        for p, owner in zip(self.all_params, self.owners, strict=True):
            dist.broadcast(p.data, src=owner)

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds."""
        if self.local is None:
            return 0
        return sum(t.numel() * t.element_size() for s in self.local.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))  # fmt: skip

    def state_dict(self) -> dict:
        """The whole optimizer's state, as the unsharded optimizer would save it (collective: every rank
        calls it; each gets the whole)."""
        index_of = {p: i for i, p in enumerate(self.all_params)}
        mine = {}
        if self.local is not None:
            for group in self.local.param_groups:
                for p in group["params"]:
                    if p in self.local.state:
                        mine[index_of[p]] = {k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                             for k, v in self.local.state[p].items()}  # fmt: skip
        gathered: list[dict] = [{} for _ in range(self.world)]
        dist.all_gather_object(gathered, mine)
        state = {k: v for shard in gathered for k, v in shard.items()}
        groups, start = [], 0
        for group in self.param_groups:
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + len(group["params"])))})  # fmt: skip
            start += len(group["params"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load an unsharded optimizer's state dict: each rank keeps the state of the parameters it owns."""
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        if self.local is None:
            return
        index_of = {p: i for i, p in enumerate(self.all_params)}  # by identity (== on tensors is elementwise)
        for p in [p for group in self.local.param_groups for p in group["params"]]:
            saved = state_dict["state"].get(index_of[p])
            if saved is not None:
                self.local.state[p] = {k: (v.to(p.device) if isinstance(v, torch.Tensor) and v.dim() else v)
                                       for k, v in saved.items()}  # fmt: skip


class ZeRO1(BucketedDDP):
    """Gradients all-reduced in buckets, the optimizer state sharded (`ShardedOptimizer`)."""

    name = "zero1"

    def optimizer(self, build) -> torch.optim.Optimizer:
        optimizer_cls, groups, kwargs = build(self.model, spec=True)
        return ShardedOptimizer(groups, optimizer_cls, **kwargs)

    def optimizer_state(self, optimizer: ShardedOptimizer) -> list:
        return list(optimizer.local.state.items()) if optimizer.local is not None else []


__all__ = ["ShardedOptimizer", "ZeRO1", "assign_owners"]
