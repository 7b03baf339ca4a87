"""A lock on a directory, so that two processes never write one run at the same time.

`directory/.lock` is held with `flock` for as long as the process works on the directory; the kernel
releases it when the process ends, however it ends (even `kill -9`), so a lock is never left stale.
The file says who holds it, for the message the second process prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from scratchlm.errors import ScratchLMError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Hold the lock on `directory` (created if missing) or raise naming the process that holds it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise ScratchLMError(f"{directory} is in use by {holder}: wait for it to finish or stop it first") from None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp} ({command})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def is_locked(directory: str | os.PathLike) -> bool:
    """Whether a process holds `directory`'s lock now (False if it has no lock file)."""
    path = Path(directory) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a shared lock taken here
    return False
