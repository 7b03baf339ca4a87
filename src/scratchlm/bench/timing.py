"""Timed training work for one configuration: the forward pass (with autograd recording, as in
training), forward + backward, and the full step (zero_grad, forward, backward, AdamW). Warm-up
steps first (compilation, caches), then each timed step ends with the device synchronised.

MFU counts the model's matmul FLOPs (`accounting.forward_flops`; backward twice the forward; the
optimizer's elementwise work is left out, as is usual) over the device's peak at the compute dtype.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass

import torch

from scratchlm import accounting
from scratchlm.train.config import TrainConfig
from scratchlm.train.setup import build_model, build_optimizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # DTYPE_NAMES


@dataclass
class Workload:
    """A built model and optimizer, a random batch (batch, context) and how to run each mode."""

    config: TrainConfig
    device: torch.device
    dtype: str  # "fp32", or a half dtype that the forward autocasts to
    compiled: bool = False

    def __post_init__(self) -> None:
        self.model = build_model(self.config, self.device)
        self.optimizer = build_optimizer(self.config, self.model)
        m = self.config.model
        gen = torch.Generator().manual_seed(0)
        shape = (self.config.batch_size, m.context_length)
        self.token_ids = torch.randint(0, m.vocab_size, shape, generator=gen).to(self.device)
        self.targets = torch.randint(0, m.vocab_size, shape, generator=gen).to(self.device)
        self.loss_fn = torch.compile(self.model.loss) if self.compiled else self.model.loss

    def autocast(self):
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.dtype])

    def loss(self) -> torch.Tensor:
        with self.autocast():
            return self.loss_fn(self.token_ids, self.targets)

    def run(self, mode: str) -> None:
        if mode == "forward":
            self.loss()
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        if mode == "step":
            self.optimizer.step()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def tokens(self) -> int:
        return self.token_ids.numel()

    def flops(self, mode: str) -> float:
        """Matmul FLOPs of one run of `mode`."""
        m = self.config.model
        forward = accounting.forward_flops(m, self.config.batch_size, m.context_length)["total"]
        return forward if mode == "forward" else 3 * forward

    def peak_flops(self) -> float:
        """The device's peak at the compute dtype (the CPU's measured fp32 peak for every dtype)."""
        return accounting.device_peak_flops(self.device, "fp32" if self.dtype == "fp32" else "bf16")


@dataclass
class Timing:
    mode: str
    seconds: list[float]
    tokens: int
    flops: float
    peak_flops: float

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.seconds)

    @property
    def std_s(self) -> float:
        return statistics.stdev(self.seconds) if len(self.seconds) > 1 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.mean_s

    @property
    def mfu(self) -> float:
        return self.flops / self.mean_s / self.peak_flops

    def as_dict(self) -> dict:
        return {"mode": self.mode, "mean_s": self.mean_s, "std_s": self.std_s, "seconds": self.seconds,
                "tokens_per_s": self.tokens_per_s, "flops": self.flops, "mfu": self.mfu}  # fmt: skip


def time_mode(workload: Workload, mode: str, warmup: int, steps: int) -> Timing:
    """`warmup` untimed runs of `mode`, then `steps` timed ones, each ended by a device synchronise."""
    for _ in range(warmup):
        workload.run(mode)
    workload.synchronize()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        workload.run(mode)
        workload.synchronize()
        seconds.append(time.perf_counter() - start)
    return Timing(mode, seconds, workload.tokens, workload.flops(mode), workload.peak_flops())
