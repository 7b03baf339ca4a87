"""Fully sharded data parallelism of our own: every Linear and Embedding weight split along dim 0 over the
ranks, each rank keeping (and updating) only its rows.

The model is cut into units: each transformer block, and the root (everything else: the embeddings, the
final norm, the LM head). A unit's weights exist whole only while it computes:

    forward   the unit's shards are all-gathered (in the compute dtype) into one flat buffer, and its
              modules see views of it as their weights; the next block's gather is launched before this
              block computes (prefetch); after the block the views are dropped.
    backward  the first saved weight that backward needs gathers the unit again (prefetching the unit
              backward reaches next); the gathered weights' gradient is reduce-scattered to the shards in
              fp32 and the copy is freed.

A block under activation checkpointing gathers its unit again when backward recomputes it.

Saved-for-backward tensors that lie in a gathered buffer (a weight, a view of one, q|k|v stacked) are
replaced by a note of where they lie (`saved_tensors_hooks`), so no gathered copy outlives its unit's
forward. Other parameters (the norms' gains) are replicated, their gradients all-reduced as in DDP.

Each weight's rows are padded to a multiple of the world size (torch.chunk's split: the last ranks may hold
padding rows, always zero). A sharded weight that gets no gradient in a step gets a zero gradient, not none.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from scratchlm.distributed.base import Strategy, flatten, unflatten_into
from scratchlm.model.layers import Embedding, Linear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ShardedWeight:
    """One weight's place in its unit. shard: this rank's rows (rows, *rest), a parameter of the model;
    full_shape: (d0, *rest); uses: the (module, attribute) pairs that hold it (two for tied weights)."""

    shard: nn.Parameter
    full_shape: torch.Size
    uses: list[tuple[nn.Module, str]]

    @property
    def numel(self) -> int:
        return self.full_shape.numel()


def shard_rows(full: Tensor, rank: int, world: int) -> Tensor:
    """Rows [rank * r, (rank + 1) * r) of `full` (d0, ...), r = ceil(d0 / world), zero-padded past d0."""
    rows = -(-full.shape[0] // world)
    padded = full.new_zeros((rows * world, *full.shape[1:]))
    padded[: full.shape[0]] = full
    return padded[rank * rows : (rank + 1) * rows].clone()


def gather_rows(shards: Tensor, numel: int) -> Tensor:
    """shards: (world, rows * rest), every rank's rows of one weight -> the weight's first `numel` elements."""
    return shards.reshape(-1)[:numel]


class Unit:
    """A group of weights gathered and freed together. `full` holds the gathered buffer (1-D, the weights'
    elements end to end, in the compute dtype) while forward or backward needs it."""

    def __init__(self, weights: list[ShardedWeight], dtype: torch.dtype) -> None:
        self.weights, self.dtype = weights, dtype
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.shard_numels = [w.shard.numel() for w in weights]
        self.full: Tensor | None = None
        self.pending: tuple[dist.Work, Tensor] | None = None  # a gather in flight
        self.reductions: list[tuple[dist.Work, Tensor]] = []  # reduce-scatters in flight

    def prefetch(self) -> None:
        """Launch the all-gather of the shards (does nothing if gathered or in flight)."""
        if self.full is not None or self.pending is not None or not self.weights:
            return
        send = torch.cat([w.shard.detach().reshape(-1) for w in self.weights]).to(self.dtype)
        received = send.new_empty(self.world * send.numel())
        self.pending = dist.all_gather_single(received, send, async_op=True), received

    def gather(self) -> Tensor:
        """The whole weights, end to end: (sum of numel,) in the compute dtype."""
        if self.full is None:
            self.prefetch()
            work, received = self.pending
            work.wait()
            self.pending = None
            by_weight = received.view(self.world, -1).split(self.shard_numels, dim=1)
            self.full = torch.cat([gather_rows(s, w.numel) for s, w in zip(by_weight, self.weights, strict=True)])
            received.untyped_storage().resize_(0)  # freed now, whatever the finished collective still holds
        return self.full

    def views(self, full: Tensor) -> Iterator[tuple[ShardedWeight, Tensor]]:
        for w, part in zip(self.weights, full.split([w.numel for w in self.weights]), strict=True):
            yield w, part.view(w.full_shape)

    def reduce_scatter(self, grad_full: Tensor) -> None:
        """Launch the reduce-scatter (fp32 sum) of the gathered weights' gradient; `finish` adds it."""
        rows = []
        for w, grad in self.views(grad_full.float()):
            padded = grad.new_zeros((w.shard.shape[0] * self.world, *w.full_shape[1:]))
            padded[: w.full_shape[0]] = grad
            rows.append(padded.view(self.world, -1))
        send = torch.cat(rows, dim=1)  # (world, sum of shard numel): rank r's rows in row r
        mine = send.new_empty(send.shape[1])
        self.reductions.append((dist.reduce_scatter_single(mine, send.view(-1), async_op=True), mine))

    def finish(self) -> None:
        """Wait for the reduce-scatters and add their mean over the ranks to the shards' gradients; drop
        a prefetched gather nobody used (the shards are about to change)."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending, self.full = None, None
        for work, mine in self.reductions:
            work.wait()
            for w, grad in zip(self.weights, (mine / self.world).split(self.shard_numels), strict=True):
                if w.shard.requires_grad:
                    grad = grad.view_as(w.shard)
                    w.shard.grad = grad if w.shard.grad is None else w.shard.grad + grad
        self.reductions.clear()


class GatheredWeights(torch.autograd.Function):
    """The unit's gathered buffer as a node of the graph: its backward receives the gradient of every
    weight in the unit at once, when backward has passed the whole unit."""

    @staticmethod
    def forward(ctx, unit: Unit, *shards: Tensor) -> Tensor:
        ctx.unit = unit
        return unit.gather()

    @staticmethod
    def backward(ctx, grad_full: Tensor):
        unit = ctx.unit
        unit.reduce_scatter(grad_full)
        unit.full = None  # the copy gathered for backward
        return (None, *[None for _ in unit.weights])


@dataclass
class SavedView:
    """A saved-for-backward tensor that lies in a unit's gathered buffer, by its place there."""

    unit: Unit
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class OwnFSDP(Strategy):
    name = "fsdp"
    sharded = True

    def __init__(self, model: nn.Module, compute_dtype: str = "float32") -> None:
        super().__init__(model)
        self.rank, dtype = dist.get_rank(), DTYPES[compute_dtype]
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
        blocks = list(model.layers)
        self.units = [Unit(weights, dtype) for weights in self._shard(model, blocks)]
        self.root, self.blocks = self.units[0], self.units[1:]
        self._weight_of = {id(w.shard): w for unit in self.units for w in unit.weights}
        self.replicated = [p for p in model.parameters() if p.requires_grad and id(p) not in self._weight_of]
        self._mesh: DeviceMesh | None = None  # for checkpoints, made when first needed
        self._live: dict[int, Unit] = {}  # storage address of a gathered forward buffer -> its unit
        backward_order = [self.root, *reversed(self.blocks)]
        self._backward_next = dict(itertools.pairwise(backward_order))
        self._entered: set[Unit] = set()  # the units whose forward ran in this step
        for i, block in enumerate(blocks):
            if getattr(block, "checkpointed", False):  # its body runs again in backward: gather for that too
                block._forward = self._gathering(i, block._forward)
                continue
            block.register_forward_pre_hook(lambda m, args, i=i: self._enter(self.blocks[i], self.units[i + 2 :]))
            block.register_forward_hook(lambda m, args, out, i=i: self._leave(self.blocks[i]))

    def _gathering(self, i: int, body):
        """A checkpointed block's body (`TransformerBlock._forward`) with its unit gathered around it, in
        forward and again when backward recomputes it. The recomputation's graph only refills the saved
        tensors; the forward's `GatheredWeights` node still reduce-scatters the gradient, once."""

        def run(*args):
            unit = self.blocks[i]
            recomputing = unit in self._entered
            self._entered.add(unit)
            following = self._backward_next.get(unit)
            self._enter(unit, ([following] if following else []) if recomputing else self.units[i + 2 :])
            try:
                return body(*args)
            finally:
                self._leave(unit)

        return run

    def _shard(self, model: nn.Module, blocks: list[nn.Module]) -> list[list[ShardedWeight]]:
        """Replace every Linear / Embedding weight by this rank's rows of it; the weights of each unit
        (the root's first, then each block's)."""
        unit_of = dict.fromkeys(model.parameters(), 0)
        for index, block in enumerate(blocks, start=1):
            unit_of.update(dict.fromkeys(block.parameters(), index))
        weights: dict[nn.Parameter, ShardedWeight] = {}
        for module in [m for m in model.modules() if isinstance(m, Linear | Embedding)]:
            full = module.weight
            if full not in weights:
                shard = nn.Parameter(shard_rows(full.data, self.rank, self.world), requires_grad=full.requires_grad)
                weights[full] = ShardedWeight(shard, full.shape, [])
            weights[full].uses.append((module, "weight"))
            module._parameters["weight"] = weights[full].shard
        units: list[list[ShardedWeight]] = [[] for _ in range(len(blocks) + 1)]
        for full, weight in weights.items():
            units[unit_of[full]].append(weight)
        return units

    def _enter(self, unit: Unit, later: list[Unit]) -> None:
        """Before a unit's forward: its weights whole (gathered, or waited for) and the next one's gather
        launched."""
        if later:
            later[0].prefetch()
        if not unit.weights:
            return
        full = unit.gather()
        trained = [w.shard for w in unit.weights if w.shard.requires_grad]
        if torch.is_grad_enabled() and trained:
            full = GatheredWeights.apply(unit, *trained)
        self._live[full.untyped_storage().data_ptr()] = unit
        for w, view in unit.views(full):
            for module, attribute in w.uses:
                module.__dict__[attribute] = view  # found before the shard in module._parameters

    def _leave(self, unit: Unit) -> None:
        for w in unit.weights:
            for module, attribute in w.uses:
                module.__dict__.pop(attribute, None)
        self._live = {k: u for k, u in self._live.items() if u is not unit}
        unit.full = None

    def _pack(self, tensor: Tensor) -> Tensor | SavedView:
        unit = self._live.get(tensor.untyped_storage().data_ptr()) if self._live else None
        if unit is None:
            return tensor
        return SavedView(unit, tensor.size(), tensor.stride(), tensor.storage_offset())

    def _unpack(self, saved: Tensor | SavedView) -> Tensor:
        if not isinstance(saved, SavedView):
            return saved
        full = saved.unit.gather()
        following = self._backward_next.get(saved.unit)
        if following is not None:
            following.prefetch()
        return full.as_strided(saved.size, saved.stride, saved.offset)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        self._entered.clear()
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            self._enter(self.root, self.blocks)
            try:
                return self.model.loss(x, y)
            finally:
                self._leave(self.root)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        yield  # gradients are reduce-scattered on every micro-batch (they are sharded: nothing to keep whole)

    def finish_gradients(self) -> None:
        for unit in self.units:
            unit.finish()
        grads = [p.grad for p in self.replicated if p.grad is not None]
        if grads:
            flat = flatten(grads)
            dist.all_reduce(flat)
            unflatten_into(flat / self.world, grads)

    def clip(self, max_norm: float, eps: float = 1e-6) -> Tensor:
        """As `clip_grad_norm` on the whole model: the shards' squared norms summed over the ranks."""
        sharded = [w.shard.grad for unit in self.units for w in unit.weights if w.shard.grad is not None]
        replicated = [p.grad for p in self.replicated if p.grad is not None]
        square = torch.zeros((), dtype=torch.float32)
        if sharded:
            square = torch.stack(torch._foreach_norm(sharded)).square().sum()
        dist.all_reduce(square)
        if replicated:
            square = square + torch.stack(torch._foreach_norm(replicated)).square().sum()
        norm = square.sqrt()
        if sharded or replicated:
            torch._foreach_mul_(sharded + replicated, torch.clamp(max_norm / (norm + eps), max=1.0))
        return norm

    def _unshard(self, tensor: Tensor, weight: ShardedWeight) -> Tensor:
        """Every rank's rows of a tensor shaped like `weight`'s shard (the shard, its optimizer state) ->
        the whole (full_shape), on every rank."""
        gathered = tensor.new_empty(self.world * tensor.numel())
        dist.all_gather_single(gathered, tensor.detach().reshape(-1).contiguous())
        return gathered[: weight.numel].view(weight.full_shape)

    def _per_parameter(self, optimizer: torch.optim.Optimizer) -> list[tuple[int, nn.Parameter]]:
        """(index in the optimizer's state dict, parameter), in the optimizer's order."""
        return list(enumerate(p for group in optimizer.param_groups for p in group["params"]))

    def full_state(self, optimizer) -> tuple[dict, dict]:
        model_state = {}
        for key, value in self.model.state_dict(keep_vars=True).items():
            weight = self._weight_of.get(id(value))
            model_state[key] = self._unshard(value, weight) if weight else value.detach()
        optimizer_state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: copy
        optimizer_state["state"] = {index: dict(state) for index, state in optimizer_state["state"].items()}
        for index, p in self._per_parameter(optimizer):
            weight = self._weight_of.get(id(p))
            state = optimizer_state["state"].get(index, {})
            for name in sorted(state) if weight else ():
                if isinstance(state[name], Tensor) and state[name].shape == p.shape:
                    state[name] = self._unshard(state[name], weight)
        return model_state, optimizer_state

    def distributed(self, tensor: Tensor, param: Tensor | None = None) -> Tensor:
        """A shard (or its optimizer state) as a DTensor sharded along dim 0, its padding rows left out."""
        weight = self._weight_of.get(id(tensor if param is None else param))
        if weight is None or tensor.shape != weight.shard.shape:
            return tensor.detach()
        if self._mesh is None:
            self._mesh = init_device_mesh(tensor.device.type, (self.world,))
        rows = max(0, min(tensor.shape[0], weight.full_shape[0] - self.rank * tensor.shape[0]))
        stride = torch.empty(weight.full_shape, device="meta").stride()
        return DTensor.from_local(tensor.detach()[:rows], self._mesh, [Shard(0)], run_check=False,
                                  shape=weight.full_shape, stride=stride)  # fmt: skip

    def load_full_state(self, model_state: dict, optimizer_state: dict | None, optimizer) -> None:
        mine = dict(model_state)
        for key, value in self.model.state_dict(keep_vars=True).items():
            if id(value) in self._weight_of and key in mine:
                mine[key] = shard_rows(mine[key], self.rank, self.world)
        self.model.load_state_dict(mine)
        if optimizer_state is None:
            return
        optimizer_state = {**optimizer_state, "state": dict(optimizer_state["state"])}
        for index, p in self._per_parameter(optimizer):
            weight = self._weight_of.get(id(p))
            if weight and index in optimizer_state["state"]:
                optimizer_state["state"][index] = {
                    name: shard_rows(v, self.rank, self.world) if isinstance(v, Tensor) and v.shape == weight.full_shape
                    else v for name, v in optimizer_state["state"][index].items()}  # fmt: skip
        optimizer.load_state_dict(optimizer_state)
