"""Where work runs: a process-parallel map for the data stages (`map_bounded`), and executors for jobs
(commands such as one training run of a sweep): `LocalExecutor` runs them as local processes, as many
at once as asked; `RayExecutor` hands them to a Ray cluster (`pip install "scratchlm[ray]"`; a local
Ray instance when no address is given).

Ctrl-C reaches every process of the terminal's group: map workers ignore it and the parent alone
stops, cancelling what is queued, so the user sees one line, not a traceback from each worker. Jobs
run in sessions of their own, so a stop reaches them only through the executor: when the parent is
interrupted (Ctrl-C, or SIGINT / SIGTERM sent to it alone), it starts no more jobs and sends each running
one SIGINT, once per stop, so a `scratchlm train` saves a checkpoint and exits (the next run resumes it);
a second Ctrl-C makes them stop at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchlm.errors import ScratchLMError


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


@dataclass
class Job:
    """A command to run, its output appended to `log`; `env`: variables added to the environment."""

    name: str
    command: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)


def run_job(job: Job) -> int:
    """Run one job to the end; its exit status."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "ab") as log:
        return subprocess.run(
            job.command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **job.env}
        ).returncode


INTERRUPTED = 130  # a job's exit status after a stop (and of jobs never started because of one)


def python_command(*args: str) -> list[str]:
    """`python -m ...` with this interpreter (the same environment on every worker of this machine)."""
    return [sys.executable, *args]


class LocalExecutor:
    """Jobs as local processes, `workers` at once, each in a session of its own."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, workers)
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self._stopping = False

    def _run(self, job: Job) -> int:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log, "ab") as log:
            with self._lock:
                if self._stopping:
                    return INTERRUPTED
                process = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT,
                                           env={**os.environ, **job.env}, start_new_session=True)  # fmt: skip
                self._running.add(process)
            try:
                return process.wait()
            finally:
                with self._lock:
                    self._running.discard(process)

    def _interrupt(self, stop: bool = True) -> None:
        with self._lock:
            self._stopping = self._stopping or stop
            for process in self._running:
                process.send_signal(signal.SIGINT)

    def run(self, jobs: list[Job], on_done: Callable[[Job, int], None]) -> None:
        """Run every job; `on_done(job, exit status)` as each ends, in the order they end. On a stop
        (KeyboardInterrupt here) the running jobs are interrupted and waited for, then it is raised."""
        with ThreadPoolExecutor(self.workers) as pool:
            pending = {pool.submit(self._run, job): job for job in jobs}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        on_done(pending.pop(future), future.result())
            except BaseException:
                self._interrupt()
                left = {future: job for future, job in pending.items() if not future.cancel()}
                while left:  # the running jobs save their checkpoints and exit
                    try:
                        done, _ = wait(left, return_when=FIRST_COMPLETED)
                    except KeyboardInterrupt:  # a second Ctrl-C: they stop at once
                        self._interrupt()
                        continue
                    for future in done:
                        on_done(left.pop(future), future.result())
                raise


class RayExecutor:
    """Jobs as Ray tasks (`num_cpus` each) on the cluster at `address`, or on a Ray instance started
    here for this process (listening on 127.0.0.1) when there is none."""

    def __init__(self, address: str | None = None, num_cpus: float = 1, local_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ScratchLMError('--executor ray needs Ray: pip install "scratchlm[ray]"') from None
        self.ray, self.num_cpus = ray, num_cpus
        if not ray.is_initialized():
            options = {"address": address} if address else {"num_cpus": local_cpus or os.cpu_count(),
                                                             "_node_ip_address": "127.0.0.1"}  # fmt: skip
            ray.init(**options, include_dashboard=False, log_to_driver=False)

    def run(self, jobs: list[Job], on_done: Callable[[Job, int], None]) -> None:
        remote = self.ray.remote(num_cpus=self.num_cpus)(run_job)
        pending = {remote.remote(job): job for job in jobs}
        try:
            while pending:
                done, _ = self.ray.wait(list(pending), num_returns=1)
                for ref in done:
                    on_done(pending.pop(ref), self.ray.get(ref))
        except BaseException:
            for ref in pending:
                self.ray.cancel(ref)
            raise

    def shutdown(self) -> None:
        self.ray.shutdown()
