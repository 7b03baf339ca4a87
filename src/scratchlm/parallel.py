"""Process-parallel map that keeps results in order and reads its input only a little ahead."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any


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
    with ProcessPoolExecutor(workers, initializer=initializer, initargs=initargs) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers * in_flight_per_worker:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()
