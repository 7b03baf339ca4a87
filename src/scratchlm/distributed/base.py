"""What every strategy is: a transformation of the built model, with the hooks the training step calls.

    strategy = make_strategy(config.parallel, model)   # after the model is built
    optimizer = strategy.optimizer(build_optimizer)    # ZeRO-1 shards it; the others build it as is
    for i, (x, y) in enumerate(micro_batches):
        with strategy.micro_batch(last=i == n - 1):    # DDP variants sync only on the last one
            strategy.loss(x, y).backward()
    strategy.finish_gradients()                        # every gradient is the mean over the ranks now

Ranks agree on which parameters get gradients (the same model graph on every rank): one whose
gradient is None is left out everywhere, as one process would leave it out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from scratchlm.optim import clip_grad_norm


class LossModule(nn.Module):
    """The model's training loss as a module's forward, for wrappers that hook `forward` (DDP, FSDP2)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.model.loss(x, y)


class Strategy:
    """One process's part of a data-parallel run; this base class is a single process (strategy "none")."""

    name = "none"
    sharded = False  # parameters sharded over the ranks: every rank must run every forward pass

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.model.loss(x, y)

    def optimizer(self, build: Callable[[nn.Module], torch.optim.Optimizer]) -> torch.optim.Optimizer:
        return build(self.model)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        yield

    def finish_gradients(self) -> None:
        """After the last micro-batch's backward: make every gradient the mean over the ranks."""

    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def clip(self, max_norm: float) -> Tensor:
        """Clip the gradients to a global L2 norm of `max_norm`; returns the norm before clipping."""
        return clip_grad_norm(self.trained_parameters(), max_norm)

    def full_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """The model's and the optimizer's whole (unsharded) state, for a checkpoint that any world size
        can resume. Collective: every rank calls it."""
        return self.model.state_dict(), optimizer.state_dict()

    def load_full_state(self, model_state: dict, optimizer_state: dict | None, optimizer) -> None:
        self.model.load_state_dict(model_state)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)

    def sharded_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, dict]]:
        """What this rank writes to a distributed checkpoint (`scratchlm.distributed.checkpoint`): the
        tensors, keyed `model.<name>` and `optim.<parameter name>.<state key>` (a shard as a DTensor; a
        tensor every rank holds is written once), and the optimizer's other per-parameter state
        ({parameter name: {key: value}}) for the parameters whose state this rank holds."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        tensors = {f"model.{k}": self.distributed(v) for k, v in self.model.state_dict(keep_vars=True).items()}
        values: dict[str, dict] = {}
        for p, state in self.optimizer_state(optimizer):
            for key, value in state.items():
                if isinstance(value, Tensor):
                    tensors[f"optim.{names[id(p)]}.{key}"] = self.distributed(value, p)
                else:
                    values.setdefault(names[id(p)], {})[key] = value
        return tensors, values

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> list[tuple[Tensor, dict]]:
        """(parameter, its optimizer state) for the parameters whose state this rank holds."""
        return list(optimizer.state.items())

    def distributed(self, tensor: Tensor, param: Tensor | None = None) -> Tensor:
        """`tensor` (a parameter, or `param`'s optimizer state) as the checkpoint holds it."""
        return tensor.detach()


class Replicated(Strategy):
    """Data parallelism with the whole model on every rank: every rank starts from rank 0's weights
    (and buffers), and the subclasses keep them equal by averaging the gradients."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def flatten(grads: list[Tensor]) -> Tensor:
    """The gradients end to end in one new buffer (what one collective sends)."""
    return torch.cat([g.reshape(-1) for g in grads]) if grads else torch.zeros(0)


def unflatten_into(flat: Tensor, grads: list[Tensor]) -> None:
    """Copy `flatten(grads)`'s layout back into `grads`."""
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))
