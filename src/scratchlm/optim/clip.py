"""Gradient clipping by global L2 norm."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[Tensor], max_norm: float, eps: float = 1e-6) -> Tensor:
    """Scale all gradients by max_norm / (norm + eps) when their global L2 norm exceeds max_norm.

    Parameters without gradients are skipped. Returns the norm before clipping (as a 0-d tensor),
    like `torch.nn.utils.clip_grad_norm_`.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    scale = torch.clamp(max_norm / (norm + eps), max=1.0)
    torch._foreach_mul_(grads, scale)
    return norm
