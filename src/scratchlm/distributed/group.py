"""The process group: joining it (under `scratchlm train --nproc N` or torchrun, which set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), and the local launcher behind `--nproc`.

gloo on CPUs, NCCL on CUDA with one device per local rank. Collectives time out (`TIMEOUT_S`) instead
of hanging when a rank dies; the launcher stops the other ranks as soon as one fails and names it
(the last complete checkpoint stays the latest: a checkpoint is written whole or not at all).

Multi-node, with torchrun on every node:
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \\
             --rdzv_endpoint HOST:29500 -m scratchlm.cli train --config CONFIG
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from scratchlm.errors import ScratchLMError

TIMEOUT_S = 120  # a collective that waits longer than this for a dead rank fails instead of hanging


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> Rank:
    """This process's place in the job, from torchrun's variables (a single process without them)."""
    try:
        return Rank(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))  # fmt: skip
    except ValueError:
        raise ScratchLMError(
            f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, got {os.environ.get('RANK')!r}, "
            f"{os.environ.get('WORLD_SIZE')!r}, {os.environ.get('LOCAL_RANK')!r}"
        ) from None


def join(rank: Rank, device_type: str) -> None:
    """Join the process group (a no-op for a single process)."""
    import torch
    import torch.distributed as dist

    if rank.world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank.local_rank)
    dist.init_process_group(backend, rank=rank.rank, world_size=rank.world_size,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))  # fmt: skip


def leave() -> None:
    """Leave the process group once every rank is done (a rank that tears down while another still
    talks to it aborts)."""
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(RuntimeError):  # a rank that died: nothing to wait for
            dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m scratchlm.cli *argv` as `nproc` local ranks (the environment torchrun would give
    them). When one fails, the others are stopped at once (they could only wait for it) and the error
    names the rank that failed first. Returns its exit status, or 0."""
    port = free_port()
    procs, logs = [], []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        # Messages are held back: shown for the rank that failed first (or rank 0's, when all went well).
        logs.append(tempfile.TemporaryFile("w+"))  # noqa: SIM115 - open for the job
        procs.append(subprocess.Popen([sys.executable, "-m", "scratchlm.cli", *argv], env=env, stderr=logs[-1]))
    running = {p.pid: rank for rank, p in enumerate(procs)}
    failed: tuple[int, int] | None = None
    try:
        while running and failed is None:
            pid, status = os.wait()  # the next rank to end, in the order they end
            if pid in running:
                rank, code = running.pop(pid), os.waitstatus_to_exitcode(status)
                procs[rank].returncode = code
                failed = (rank, code) if code else None
    except KeyboardInterrupt:  # Ctrl-C reached every rank too: let them save and stop
        for p in procs:
            p.wait()
        return 130
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    rank, status = failed or (0, 0)
    logs[rank].seek(0)
    sys.stderr.write(logs[rank].read())
    if failed and (rank > 0 or status < 0):
        how = f"signal {-status}" if status < 0 else f"exit status {status}"
        print(f"scratchlm: error: rank {rank} of {nproc} failed ({how}); the other ranks were stopped",
              file=sys.stderr)  # fmt: skip
    return 0 if not failed else status if status > 0 else 1
