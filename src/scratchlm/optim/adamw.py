"""Optimizers written out. Each keeps its state per parameter and updates all parameters of a group
with multi-tensor (`torch._foreach_*`) operations: the same arithmetic as a per-parameter loop, with
one kernel launch per operation instead of one per parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def _with_grads(group: dict) -> list[Tensor]:
    return [p for p in group["params"] if p.grad is not None]


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as `torch.optim.AdamW` computes it:

    theta <- theta (1 - lr * weight_decay)
    m <- beta1 m + (1 - beta1) g            v <- beta2 v + (1 - beta2) g^2
    theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = _with_grads(group)
            if not params:
                continue
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            grads, ms, vs, steps = [], [], [], []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                grads.append(p.grad)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if wd != 0:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(ms, grads, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, 1 - beta2)
            # Parameters of a group usually share a step count; group them by it to stay exact if not.
            for t in sorted(set(steps)):
                idx = [i for i, s in enumerate(steps) if s == t]
                step_size = lr / (1 - beta1**t)
                bias_correction2_sqrt = math.sqrt(1 - beta2**t)
                denom = torch._foreach_sqrt([vs[i] for i in idx])
                torch._foreach_div_(denom, bias_correction2_sqrt)
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_([params[i] for i in idx], [ms[i] for i in idx], denom, -step_size)
        return loss


class SGD(torch.optim.Optimizer):
    """theta <- theta - lr * g (optionally with momentum mu: b <- mu b + g; theta <- theta - lr b)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0) -> None:
        if lr < 0 or momentum < 0:
            raise ValueError(f"invalid SGD settings: lr={lr}, momentum={momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = _with_grads(group)
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["momentum"]:
                bufs = []
                for p, g in zip(params, grads, strict=True):
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = g.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                    bufs.append(state["momentum_buffer"])
                grads = bufs
            torch._foreach_add_(params, grads, alpha=-group["lr"])
        return loss


class AdaGrad(torch.optim.Optimizer):
    """G <- G + g^2; theta <- theta - lr * g / (sqrt(G) + eps)."""

    def __init__(self, params: Iterable, lr: float = 1e-2, eps: float = 1e-10) -> None:
        if lr < 0 or eps < 0:
            raise ValueError(f"invalid AdaGrad settings: lr={lr}, eps={eps}")
        super().__init__(params, dict(lr=lr, eps=eps))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = _with_grads(group)
            if not params:
                continue
            grads = [p.grad for p in params]
            sums = []
            for p in params:
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.zeros_like(p)
                sums.append(state["sum"])
            torch._foreach_addcmul_(sums, grads, grads)
            denom = torch._foreach_sqrt(sums)
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_addcdiv_(params, grads, denom, -group["lr"])
        return loss
