"""Cross-entropy from logits via log-sum-exp, finite even for logits of 1e4 and beyond."""

from __future__ import annotations

import torch
from torch import Tensor


def cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """-log softmax(logits)[target]. (Training fuses the LM head with this loss: `scratchlm.model.head`.)

    logits: (..., vocab) any float dtype (computed in at least float32), targets: (...) integer.
    reduction: "mean" -> 0-d tensor, "none" -> (...) per-token losses in nats.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # log sum_j exp(z_j) - z_t with z = logits - max: every exp is <= 1, and subtracting the max from
    # both terms (instead of adding it back) avoids cancellation when the logits are large.
    shifted = logits - logits.amax(dim=-1, keepdim=True).detach()
    losses = shifted.exp().sum(dim=-1).log() - shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return losses.mean() if reduction == "mean" else losses
