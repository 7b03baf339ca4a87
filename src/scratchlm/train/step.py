"""One training step: the micro-batches (forward under autocast, backward), clipping, the update, and
the check that every loss since the last look was finite.

The step never waits for the device: the loss stays a device tensor until the loop reads it (where it
logs, evaluates, saves or times the budget), and finiteness is accumulated on the device meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from scratchlm.data.loader import BatchSampler
from scratchlm.distributed.base import Strategy
from scratchlm.errors import ScratchLMError
from scratchlm.train.config import TrainConfig
from scratchlm.train.setup import autocast


class TrainStep:
    """`step(sampler, lr)` runs one optimizer step on `config.grad_accum_steps` batches from `sampler`.

    strategy: how this process takes part (`scratchlm.distributed`; a single process is the base
    `Strategy`): its loss, when gradients are synchronised, and how they are clipped. loss_fn: the loss
    to call instead of the strategy's (the model's compiled loss). Returns (the step's mean loss on
    this process, the gradient norm before clipping or None without clipping), both device tensors.
    """

    def __init__(self, strategy: Strategy, optimizer, config: TrainConfig, device: torch.device,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:  # fmt: skip
        self.strategy, self.optimizer, self.loss_fn = strategy, optimizer, loss_fn or strategy.loss
        self.config, self.device = config, device
        self._finite = torch.ones((), dtype=torch.bool, device=device)  # every loss since the last check

    def __call__(self, sampler: BatchSampler, lr: float) -> tuple[Tensor, Tensor | None]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's matrices run at their own multiple
        accum = self.config.grad_accum_steps
        loss_sum = torch.zeros((), device=self.device)
        for i in range(accum):
            x, y = sampler.next()
            with self.strategy.micro_batch(last=i == accum - 1):
                with autocast(self.config, self.device):
                    loss = self.loss_fn(x, y) / accum
                loss.backward()
            loss_sum += loss.detach()
        self.strategy.finish_gradients()
        self._finite &= loss_sum.isfinite()
        clip = self.config.optim.grad_clip
        grad_norm = self.strategy.clip(clip) if clip else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm

    def checked_loss(self, loss: Tensor, since_step: int, step: int, last_checkpoint: Callable[[], object]) -> float:
        """`loss` as a number (waiting for the device), after checking that every loss since `since_step`
        was finite: a run that diverged stops here, before anything is logged or saved. With several
        processes: the mean over them, and every rank stops if any saw a non-finite loss."""
        if self.strategy.world > 1:
            both = torch.stack([loss.float(), (~self._finite).float()]).cpu()
            dist.all_reduce(both)
            value, finite = both[0].item() / self.strategy.world, both[1].item() == 0
        else:
            value, finite = loss.item(), bool(self._finite.item())
        if not finite:
            raise ScratchLMError(
                f"the training loss was not finite in steps {since_step + 1}-{step} (now {value}): stopped "
                f"without saving; the last good checkpoint is {last_checkpoint() or 'none (no checkpoint yet)'}. "
                "Try a lower optim.lr."
            )
        return value
