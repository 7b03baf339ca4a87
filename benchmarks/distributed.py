"""Distributed training: all-reduce bandwidth, and the step time of every strategy against PyTorch's DDP
and FSDP2 in the same run.

    python benchmarks/distributed.py                      # gloo on the CPU
    python benchmarks/distributed.py --backend nccl       # one GPU per rank

1. All-reduce of 1 / 10 / 100 MB of float32 at 2 and 4 processes: algorithm bandwidth (bytes / time)
   and bus bandwidth (x 2 (N - 1) / N, what each link carries in a ring).
2. A training step (forward, backward, gradient sync, AdamW) of a small model at world size 2 with each
   strategy, the same per-rank batch, one thread per rank. "Exposed communication" is the step time
   beyond the same step without any synchronisation (each rank alone): what the strategy failed to hide.
   On a 2-core CPU the two ranks share the cores with gloo's threads: this measures overhead, not
   speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table

STRATEGIES = ["alone", "naive", "flat", "overlapped", "bucketed", "zero1", "fsdp", "ddp", "fsdp2"]


def _join(rank: int, world: int, port: int, backend: str) -> torch.device:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allreduce_worker(rank: int, world: int, port: int, backend: str, sizes_mb: list[int], out: str) -> None:
    device = _join(rank, world, port, backend)
    results = []
    for mb in sizes_mb:
        tensor = torch.ones(mb * 2**20 // 4, device=device)
        for _ in range(2):
            dist.all_reduce(tensor)
        times = []
        for _ in range(5):
            _sync(device)
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            _sync(device)
            times.append(time.perf_counter() - start)
        results.append((mb, statistics.median(times)))
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def _step_worker(rank: int, world: int, port: int, backend: str, strategy_name: str, steps: int, out: str) -> None:
    from scratchlm.distributed import make_strategy
    from scratchlm.distributed.base import Strategy
    from scratchlm.model import ModelConfig, TransformerLM
    from scratchlm.optim import AdamW
    from scratchlm.train.config import ParallelConfig

    device = _join(rank, world, port, backend)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=4096, context_length=128, d_model=256, n_layers=4, n_heads=8)
    model = TransformerLM(config).to(device)
    if strategy_name == "alone":
        strategy = Strategy(model)
    else:
        strategy = make_strategy(ParallelConfig(strategy=strategy_name, bucket_mb=4.0), model)
    optimizer = strategy.optimizer(lambda m, spec=False: (AdamW, list(m.parameters()), {"lr": 1e-3}) if spec
                                   else AdamW(m.parameters(), lr=1e-3))  # fmt: skip
    x = torch.randint(0, config.vocab_size, (8, config.context_length + 1), device=device)
    times, waits = [], []
    for step in range(steps + 3):
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        with strategy.micro_batch(last=True):
            strategy.loss(x[:, :-1], x[:, 1:]).backward()
        wait_start = time.perf_counter()
        strategy.finish_gradients()
        _sync(device)
        wait = time.perf_counter() - wait_start
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= 3:  # warm-up left out
            times.append(time.perf_counter() - start)
            waits.append(wait)
    if rank == 0:
        torch.save((statistics.median(times), statistics.median(waits)), out)
    dist.barrier()
    dist.destroy_process_group()


def _run(worker, world: int, *args) -> object:
    from scratchlm.distributed.group import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.pt")
        mp.spawn(worker, args=(world, free_port(), *args, out), nprocs=world)
        return torch.load(out, weights_only=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    print(machine())

    rows = []
    for world in args.worlds:
        for mb, seconds in _run(_allreduce_worker, world, args.backend, [1, 10, 100]):
            algbw = mb * 2**20 / seconds / 1e9
            rows.append([f"{world}", f"{mb} MB", f"{seconds * 1e3:.2f} ms", f"{algbw:.2f} GB/s",
                         f"{algbw * 2 * (world - 1) / world:.2f} GB/s"])  # fmt: skip
    print(f"all-reduce ({args.backend}, float32)")
    print(table(["processes", "size", "time", "algbw", "busbw"], rows))

    results = {name: _run(_step_worker, 2, args.backend, name, args.steps) for name in STRATEGIES}
    alone = results["alone"][0]
    naive_exposed = results["naive"][0] - alone
    rows = []
    for name in STRATEGIES:
        step, wait = results[name]
        exposed = step - alone
        hidden = "" if name in ("alone", "naive") or naive_exposed <= 0 else f"{1 - exposed / naive_exposed:.0%}"
        ratios = [f"{step / results[peer][0]:.2f}x" for peer in ("ddp", "fsdp2")]
        rows.append([name, f"{step * 1e3:.1f} ms", *ratios, f"{exposed * 1e3:.1f} ms", f"{wait * 1e3:.1f} ms", hidden])
    print(f"\ntraining step at world size 2 ({args.backend}; d 256, 4 layers, vocab 4096, 8 x 128 tokens per rank)")
    print(table(["strategy", "step", "vs DDP", "vs FSDP2", "exposed comm", "wait in sync", "hidden vs naive"], rows))


if __name__ == "__main__":
    main()
