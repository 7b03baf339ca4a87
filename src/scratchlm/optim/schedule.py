"""Learning-rate schedules: linear warm-up, then a decay to a minimum.

`lr_cosine_schedule` is the course's definition (CS336 assignment 1) by iteration; `cosine_lr` is the
same curve indexed by the trainer's 0-based step (it equals `lr_cosine_schedule(step + 1, ...)` with the
cycle ending at the run's last step, so the first step trains at max_lr / warmup, not at 0); and
`DecaySchedule` is what the trainer calls, which keeps the decay monotone when a wall-clock budget
re-fits the run's length. It also holds max_lr for a while and then cools down (cosine or linear) over
the last fraction of the run: warmup-stable-decay, the trapezoid of the nanoGPT speedrun and nanochat.
"""

from __future__ import annotations

import math


def lr_cosine_schedule(it: int, max_lr: float, min_lr: float, warmup_iters: int, cosine_cycle_iters: int) -> float:
    """lr(it) = it / warmup_iters * max_lr for it < warmup_iters (so lr(0) = 0); cosine from max_lr to
    min_lr for warmup_iters <= it <= cosine_cycle_iters; min_lr after."""
    if it < warmup_iters:
        return it / warmup_iters * max_lr
    if it > cosine_cycle_iters:
        return min_lr
    progress = (it - warmup_iters) / (cosine_cycle_iters - warmup_iters) if cosine_cycle_iters > warmup_iters else 1
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """lr at `step` (0-based) of a run of `total_steps` steps.

    Warm-up: max_lr * (step + 1) / warmup_steps for step < warmup_steps (reaching max_lr at its last
    step). Then cosine from max_lr down to min_lr, reaching min_lr exactly at the last step
    (`total_steps - 1`), and min_lr beyond it.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    return _cosine(_decay_position(step, warmup_steps, total_steps), max_lr, min_lr)


def _decay_position(step: int, warmup_steps: int, total_steps: int) -> float:
    """How far step is through the cosine decay: 0 at its start (the last warm-up step), 1 at the end."""
    last = total_steps - 1
    if step >= last:
        return 1.0
    return (step - (warmup_steps - 1)) / (last - (warmup_steps - 1)) if warmup_steps else step / last


def _cosine(position: float, max_lr: float, min_lr: float) -> float:
    return min_lr + 0.5 * (1 + math.cos(math.pi * position)) * (max_lr - min_lr)


def cooled_down(position: float, max_lr: float, min_lr: float, shape: str = "cosine", cooldown: float = 1.0) -> float:
    """The lr at `position` (0..1) through the decay: max_lr until 1 - cooldown, then down to min_lr at 1
    along a half cosine (shape "cosine") or a straight line ("linear"). cooldown 1 with "cosine" is `cosine_lr`'s
    decay."""
    x = max(0.0, position - (1 - cooldown)) / cooldown
    return _cosine(x, max_lr, min_lr) if shape == "cosine" else max_lr - x * (max_lr - min_lr)


class DecaySchedule:
    """Warm-up, then `cooled_down`, for a run whose length may be re-fitted while it trains (a wall-clock
    budget): the position in the decay never moves back, so after warm-up the lr only falls. (Re-fitted to
    more steps, it holds until the run catches up; to fewer, it falls faster.) With a fixed length and the
    defaults it is exactly `cosine_lr`. `position` belongs in a checkpoint."""

    def __init__(
        self, max_lr: float, min_lr: float, warmup_steps: int, position: float = 0.0, shape: str = "cosine",
        cooldown: float = 1.0,
    ) -> None:  # fmt: skip
        self.max_lr, self.min_lr, self.warmup_steps, self.position = max_lr, min_lr, warmup_steps, position
        self.shape, self.cooldown = shape, cooldown

    def __call__(self, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:
            return cosine_lr(step, self.max_lr, self.min_lr, self.warmup_steps, total_steps)
        self.position = max(self.position, _decay_position(step, self.warmup_steps, total_steps))
        return cooled_down(self.position, self.max_lr, self.min_lr, self.shape, self.cooldown)
