"""Ctrl-C and SIGTERM during training: finish the step, save, stop (a second Ctrl-C stops at once)."""

from __future__ import annotations

import contextlib
import signal


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it after each step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
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
