"""The training log: a metrics record and a console line every `log_every` steps (loss, lr, tokens/s,
MFU, ETA), and a record for each evaluation. Throughput is measured over the steps since the last line,
with the time of evaluations and checkpoints left out; MFU is against a peak that says what it is.
The times are handed in, so the loop decides when to wait for the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from scratchlm.accounting import cpu_peak_flops, device_peak_flops, record_cpu_peak
from scratchlm.train.metrics import MetricsLog, format_eta


class PeakFlops:
    """The peak FLOP/s MFU is measured against, and what it is. On a CPU that is the best matmul
    throughput ever measured here; should a run ever beat it (MFU above 100%, so the figure was taken at
    a busy moment), it is measured again, and the run's own throughput counts as a measurement too."""

    def __init__(self, device: torch.device, precision: str) -> None:
        self.device, self.value = device, device_peak_flops(device, precision)
        if device.type == "cpu":
            self.name = f"this CPU's {precision} matmul peak, best measured here ({self.value / 1e9:,.1f} GFLOP/s)"
        else:
            self.name = f"the {precision} datasheet peak of {device} ({self.value / 1e12:,.0f} TFLOP/s)"
        self._remeasured = False

    def mfu(self, flops_per_s: float, say: Callable[..., None]) -> float:
        if flops_per_s > self.value and self.device.type == "cpu":
            old = self.value
            if not self._remeasured:
                self._remeasured = True
                self.value = cpu_peak_flops(remeasure=True)
            self.value = max(self.value, record_cpu_peak(flops_per_s))
            say(
                f"warning: the run reached {flops_per_s / 1e9:,.1f} GFLOP/s, above the peak of {old / 1e9:,.1f} it "
                f"was measured against (taken at a busy moment); the peak is now {self.value / 1e9:,.1f} GFLOP/s"
            )
        return flops_per_s / self.value


class Progress:
    """Writes `metrics.jsonl` records and prints progress. first_step: where this process started."""

    def __init__(self, log: MetricsLog, peak: PeakFlops, flops_per_token: float, tokens_per_step: int,
                 first_step: int, now: float, say: Callable[..., None]) -> None:  # fmt: skip
        self.log, self.peak, self.say = log, peak, say
        self.flops_per_token, self.tokens_per_step = flops_per_token, tokens_per_step
        self.first_step, self.start = first_step, now
        self.window_start, self.window_tokens = now, 0

    def step_done(self) -> None:
        self.window_tokens += self.tokens_per_step

    def paused(self, start: float, end: float) -> None:
        """An evaluation or a checkpoint ran from start to end: the throughput window leaves that time out
        (it may fall mid-window, a checkpoint every 1,530 steps against a line every 25)."""
        self.window_start += end - start

    def train(self, step: int, total_steps: int, elapsed_s: float, loss: float, lr: float, grad_norm, now: float):
        tokens_per_s = self.window_tokens / (now - self.window_start)
        mfu = self.peak.mfu(tokens_per_s * self.flops_per_token, self.say)
        record = {"step": step, "time_s": round(elapsed_s, 3), "train/loss": loss, "lr": lr,
                  "perf/tokens_per_s": tokens_per_s, "perf/mfu": mfu}  # fmt: skip
        if grad_norm is not None:
            record["train/grad_norm"] = float(grad_norm)
        self.log.write(record)
        eta = (total_steps - step) * (now - self.start) / (step - self.first_step)
        self.say(
            f"step {step:>6}/{total_steps}  loss {loss:.4f}  lr {lr:.2e}  "
            f"{tokens_per_s:,.0f} tok/s  MFU {mfu:.1%}  ETA {format_eta(eta)}",
            flush=True,
        )
        self.window_start, self.window_tokens = now, 0

    def evaluation(self, step: int, elapsed_s: float, result) -> dict:
        record = {"step": step, "time_s": round(elapsed_s, 3), "val/loss": result.loss,
                  "val/perplexity": result.perplexity, "val/bpb": result.bits_per_byte}  # fmt: skip
        self.log.write(record)
        self.say(f"  validation: loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
                 f"bits/byte {result.bits_per_byte:.4f}  ({result.tokens:,} tokens)")  # fmt: skip
        return record
