"""Process-parallel map that keeps results in order and reads its input only a little ahead.

Ctrl-C reaches every process of the terminal's group: the workers ignore it and the parent alone
stops, cancelling what is queued, so the user sees one line, not a traceback from each worker.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def _init_worker(initializer: Callable[..., None] | None, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


def map_bounded(
    fn: Callable[[Any], Any],
    items: Iterable,
    workers: int,
    in_flight_per_worker: int = 2,
    initializer=None,
    initargs=(),
) -> Iterator:
    """`map(fn, items)` in order, over a process pool, never reading far ahead of the results."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(initializer, initargs))
    try:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers * in_flight_per_worker:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()
    except BaseException:  # an error or Ctrl-C: drop the queued work instead of finishing it
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
