"""Optimizers (AdamW, SGD, AdaGrad), the learning-rate schedule and gradient clipping."""

from scratchlm.optim.adamw import SGD, AdaGrad, AdamW
from scratchlm.optim.clip import clip_grad_norm
from scratchlm.optim.schedule import cosine_lr

__all__ = ["SGD", "AdaGrad", "AdamW", "clip_grad_norm", "cosine_lr"]
