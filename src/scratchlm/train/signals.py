"""Ctrl-C and SIGTERM during training: finish the step, save, stop (a second Ctrl-C stops at once)."""

from __future__ import annotations

import contextlib
import signal
import sys

_dropped: list[KeyboardInterrupt] = []


def keep_dropped_interrupts() -> None:
    """Remember, silently, a Ctrl-C that Python would print and drop. A KeyboardInterrupt raised inside
    a weakref callback or a `__del__` (importlib's module locks have such callbacks, so any import can
    run one) cannot propagate: Python prints "Exception ignored ... Traceback" and goes on as if no
    Ctrl-C came. `raise_dropped_interrupt` raises it again where it can propagate."""
    default = sys.unraisablehook
    if getattr(default, "keeps_interrupts", False):
        return

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _dropped.append(unraisable.exc_value)
        else:
            default(unraisable)

    hook.keeps_interrupts = True
    sys.unraisablehook = hook


def raise_dropped_interrupt() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C was dropped since `keep_dropped_interrupts`."""
    if _dropped:
        _dropped.clear()
        raise KeyboardInterrupt


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it after each step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        raise_dropped_interrupt()  # a Ctrl-C during start-up stops before the first step
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print("\nstopping after this step (a checkpoint will be saved; Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
