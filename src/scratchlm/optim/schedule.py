"""Learning-rate schedule: linear warm-up, then cosine decay to a minimum."""

from __future__ import annotations

import math


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """lr at `step` (0-based) of a run of `total_steps` steps.

    Warm-up: max_lr * (step + 1) / warmup_steps for step < warmup_steps (reaching max_lr at its last
    step). Then cosine from max_lr down to min_lr, reaching min_lr exactly at the last step
    (`total_steps - 1`), and min_lr beyond it.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    last = total_steps - 1
    if step >= last:
        return min_lr
    progress = (step - (warmup_steps - 1)) / (last - (warmup_steps - 1)) if warmup_steps else step / last
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)
