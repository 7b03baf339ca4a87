"""PyTorch's own data parallelism, the production path, behind the same interface: DistributedDataParallel,
and FSDP2 (`fully_shard` on every transformer block and on the whole, with a `MixedPrecisionPolicy`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from scratchlm.distributed.base import LossModule, Strategy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchDDP(Strategy):
    name = "ddp"

    def __init__(self, model: nn.Module, find_unused_parameters: bool = False) -> None:
        super().__init__(model)
        # find_unused_parameters: for a model with a parameter that gets no gradient (DDP would wait for it
        # forever); it costs a search of the graph every step, so it is off unless asked for.
        self.wrapped = DistributedDataParallel(LossModule(model), find_unused_parameters=find_unused_parameters)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.wrapped(x, y)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        with contextlib.nullcontext() if last else self.wrapped.no_sync():
            yield


class TorchFSDP2(Strategy):
    """Parameters sharded along dim 0 as DTensors; gathered per block for forward and backward,
    gradients reduce-scattered. compute_dtype: the dtype blocks compute in (fp32 master weights and
    fp32 gradient reduction either way)."""

    name = "fsdp2"
    sharded = True

    def __init__(self, model: nn.Module, compute_dtype: str = "float32") -> None:
        super().__init__(model)
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[compute_dtype], reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        self.wrapped = fully_shard(LossModule(model), mp_policy=policy)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.wrapped(x, y)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self.wrapped.set_requires_gradient_sync(last)
        yield

    def clip(self, max_norm: float) -> Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self.trained_parameters(), max_norm, foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def full_state(self, optimizer) -> tuple[dict, dict]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.model, options=options),
                get_optimizer_state_dict(self.model, optimizer, options=options))  # fmt: skip

    def sharded_state(self, optimizer) -> tuple[dict[str, Tensor], dict[str, dict]]:
        """The DTensor shards by PyTorch's state-dict API (FSDP2 swaps the modules' parameters between
        sharded and whole, so they are read through it, by name)."""
        tensors = {f"model.{k}": v for k, v in get_model_state_dict(self.model).items()}
        values: dict[str, dict] = {}
        for name, state in get_optimizer_state_dict(self.model, optimizer)["state"].items():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    tensors[f"optim.{name}.{key}"] = value
                else:
                    values.setdefault(name, {})[key] = value
        return tensors, values

    def load_full_state(self, model_state: dict, optimizer_state: dict | None, optimizer) -> None:
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, model_state, options=options)
        if optimizer_state is not None:  # PyTorch's API takes the state by parameter name, not number
            names = {id(p): name for name, p in self.model.named_parameters()}
            order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
            by_name = {"state": {order[i]: state for i, state in optimizer_state["state"].items()},
                       "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                                        for g in optimizer_state["param_groups"]]}  # fmt: skip
            set_optimizer_state_dict(self.model, optimizer, by_name, options=options)
