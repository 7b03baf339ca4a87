"""Optimizers (AdamW, SGD, AdaGrad, RMSProp, Muon), the learning-rate schedule and gradient clipping."""

from scratchlm.optim.adamw import SGD, AdaGrad, AdamW, Muon, RMSProp
from scratchlm.optim.clip import clip_grad_norm
from scratchlm.optim.schedule import cosine_lr

__all__ = ["SGD", "AdaGrad", "AdamW", "Muon", "RMSProp", "clip_grad_norm", "cosine_lr"]
