"""The budget clock: how many steps a run takes, fitted to a wall-clock budget as it goes.

Without a budget a run takes `max_steps`. With one (`max_minutes`), the step count is fitted from the
pace after a few warm steps, then re-fitted at every evaluation and after every tenth of the budget,
so a run still ends on budget when the machine slows down or speeds up, or when its first steps ran at
a busy moment. The pace counts everything since the last fit (evaluations and checkpoints included).
The clock is told the time (`now`) rather than reading it, so the loop decides when to wait for the
device.
"""

from __future__ import annotations

from collections.abc import Callable

from scratchlm.train.config import TrainConfig

BUDGET_PROBE_STEPS = 10  # steps timed before a wall-clock budget is turned into a step count
# Steps left out of that timing: the first compiles (torch.compile, 20-60 s on a GPU), loads kernels and
# warms the allocator. Timed from the start, a 2-minute GPU run was fitted to 51 steps instead of ~3,500.
WARMUP_STEPS = 2
# The step count is re-fitted at every evaluation and, where evaluations are further apart (or off),
# whenever this fraction of the budget has passed since the last fit.
REFIT_FRACTION = 0.1


def steps_for_budget(budget_s: float, elapsed_s: float, step: int, seconds_per_step: float, max_steps: int) -> int:
    """The step count that ends a run at its wall-clock budget: the steps done plus as many as the
    remaining time holds at `seconds_per_step` (at least one more, at most max_steps)."""
    remaining = max(0, int((budget_s - elapsed_s) / seconds_per_step))
    return max(step + 1, min(max_steps, step + remaining))


class BudgetClock:
    """`total_steps`, and when the loop must read the time for it.

    first_step: the step the run starts (or resumes) at; total_steps: the count a resumed run had
    fitted (else max_steps); resumed: whether the count was fitted before (then no probe is needed).
    """

    def __init__(self, config: TrainConfig, first_step: int, total_steps: int, resumed: bool, now: float) -> None:
        self.budget_s = config.max_minutes * 60
        self.max_steps, self.eval_every = config.max_steps, config.eval_every
        self.total_steps = total_steps
        self.first_step, self.resumed = first_step, resumed
        self.probe_step = WARMUP_STEPS + BUDGET_PROBE_STEPS  # a fresh run's first fit
        self.fitted_at = (now, first_step)  # (time, step) of the last fit

    def _probe(self, step: int) -> bool:
        return not self.resumed and step == self.probe_step

    def _fitted_once(self, step: int) -> bool:
        return self.resumed or step > self.probe_step

    def needs_time(self, step: int) -> bool:
        """Whether the loop must read the time after `step` (the end of the warm-up, the probe, an
        evaluation's re-fit), beyond the steps it reads it at anyway."""
        refit = step % self.eval_every == 0 and self._fitted_once(step)
        return self._probe(step) or refit or step == self.first_step + WARMUP_STEPS

    def update(self, step: int, now: float, elapsed_s: float, say: Callable[..., None]) -> None:
        """Re-fit `total_steps` after `step` where it is due; `elapsed_s` is the run's time so far."""
        if step == self.first_step + WARMUP_STEPS:
            self.fitted_at = (now, step)  # the pace is timed from here, after the warm-up steps
        probe = self._probe(step)
        refit = self._fitted_once(step) and (
            step % self.eval_every == 0 or now - self.fitted_at[0] >= REFIT_FRACTION * self.budget_s
        )
        if not (self.budget_s and step < self.total_steps and (probe or refit) and step > self.fitted_at[1]):
            return
        per_step = (now - self.fitted_at[0]) / (step - self.fitted_at[1])
        fitted = steps_for_budget(self.budget_s, elapsed_s, step, per_step, self.max_steps)
        if probe or abs(fitted - self.total_steps) > 0.01 * self.total_steps:
            say(f"budget: {elapsed_s / 60:.1f} of {self.budget_s / 60:g} min used at {per_step:.3f} s/step "
                f"-> {fitted} steps")  # fmt: skip
        self.total_steps, self.fitted_at = fitted, (now, step)
