"""The training loop: batches, loss, backward, clip, step, evaluate, log, checkpoint — resumable.

A run directory holds `config.toml`, `metrics.jsonl`, `loss.png` and `checkpoints/`. Starting a run
whose directory has a checkpoint continues it from there: same model, optimizer, step, schedule and
data stream, so the loss trajectory is the one an uninterrupted run would have had (bit for bit on CPU).
Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and stops. A non-finite loss stops
the run without saving, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scratchlm.accounting import cpu_peak_flops, device_peak_flops, record_cpu_peak, training_flops_per_token
from scratchlm.atomic import atomic_write_text, check_writable, remove_stale_temporaries
from scratchlm.data.encode import load_tokens
from scratchlm.data.loader import BatchSampler, eval_windows, resolve_device
from scratchlm.errors import ScratchLMError
from scratchlm.lock import directory_lock
from scratchlm.model.transformer import TransformerLM
from scratchlm.optim import SGD, AdaGrad, AdamW, clip_grad_norm, cosine_lr
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.checkpoint import check_compatible, latest_checkpoint, load_checkpoint, save_checkpoint
from scratchlm.train.config import TrainConfig, to_toml
from scratchlm.train.metrics import MetricsLog, format_eta, plot_losses, read_metrics

BUDGET_PROBE_STEPS = 10  # steps timed before a wall-clock budget is turned into a step count
# Steps left out of that timing: the first compiles (torch.compile, 20-60 s on a GPU), loads kernels and
# warms the allocator. Timed from the start, a 2-minute GPU run was fitted to 51 steps instead of ~3,500.
WARMUP_STEPS = 2
# The step count is re-fitted at every evaluation and, where evaluations are further apart (or off),
# whenever this fraction of the budget has passed since the last fit.
REFIT_FRACTION = 0.1


def steps_for_budget(budget_s: float, elapsed_s: float, step: int, seconds_per_step: float, max_steps: int) -> int:
    """The step count that ends a run at its wall-clock budget: the steps done plus as many as the
    remaining time holds at `seconds_per_step` (at least one more, at most max_steps)."""
    remaining = max(0, int((budget_s - elapsed_s) / seconds_per_step))
    return max(step + 1, min(max_steps, step + remaining))


@dataclass
class EvalResult:
    loss: float  # mean nats per token
    perplexity: float
    bits_per_byte: float
    tokens: int


def setup_cpu(config: TrainConfig) -> None:
    """Threads as configured (0 = all cores), and freed memory kept for reuse (`keep_freed_memory`)."""
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of returning it to the OS.

    By default glibc serves large blocks with fresh pages from the OS and hands them back on free, so a
    training step faults its activations in again page by page: 57,000 page faults a step (228 MB) at
    the small benchmark shape, 3-5% of the step on a 2-core CPU. With the mmap threshold at 1 GiB and
    trimming at 2 GiB the freed blocks are reused and a step faults almost never (what jemalloc or
    tcmalloc would give). The price: the process holds on to its peak memory. Returns whether the
    setting took (False without glibc: macOS, musl).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1))


def build_model(config: TrainConfig, device: torch.device) -> TransformerLM:
    torch.manual_seed(config.seed)
    return TransformerLM(config.model).to(device)


def build_optimizer(config: TrainConfig, model: TransformerLM) -> torch.optim.Optimizer:
    """Weight decay on matrices only (not on norm gains)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    o = config.optim
    if o.name == "adamw":
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
    if o.name == "sgd":
        return SGD(model.parameters(), lr=o.lr)
    return AdaGrad(model.parameters(), lr=o.lr, eps=o.eps)


def should_compile(config: TrainConfig, device: torch.device) -> bool:
    """`auto`: compile on CUDA, where it pays off in seconds; on CPU the compile time (minutes on two
    cores) outweighs its gain for short runs, so it is opt-in there (`compile = "yes"`)."""
    if config.compile == "auto":
        return device.type == "cuda"
    return config.compile == "yes"


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int, device) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (special tokens: 0), for bits per byte."""
    lengths = torch.zeros(vocab_size, dtype=torch.int64)  # integers: exact sums on any device (MPS has no float64)
    for token_id, token in tokenizer.vocab.items():
        if token_id < vocab_size and token_id not in tokenizer.special_ids.values():
            lengths[token_id] = len(token)
    return lengths.to(device)


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, byte_lengths: torch.Tensor, config: TrainConfig, device) -> EvalResult:
    """Loss, perplexity and bits per byte on the fixed validation windows."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total_nats, total_bytes, total_tokens = 0.0, 0.0, 0
    ctx = config.model.context_length
    for x, y in eval_windows(tokens, config.batch_size, ctx, config.eval_tokens, device):
        with autocast(config, device):
            mean_loss = model.loss(x, y)  # bits per byte needs only the sum of the token losses
        total_nats += mean_loss.item() * y.numel()
        total_bytes += byte_lengths[y].sum().item()
        total_tokens += y.numel()
    model.train(was_training)
    loss = total_nats / total_tokens
    return EvalResult(loss, math.exp(loss), total_nats / (math.log(2) * max(total_bytes, 1)), total_tokens)


def uses_bf16_autocast(config: TrainConfig, device: torch.device) -> bool:
    """dtype = "bfloat16" means autocast on CUDA; a CPU run is always float32."""
    return device.type == "cuda" and config.dtype == "bfloat16"


def autocast(config: TrainConfig, device: torch.device):
    if uses_bf16_autocast(config, device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _StopFlag:
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


def load_data(config: TrainConfig):
    """The training and validation token arrays and their tokenizer, checked against each other and
    against the model: same tokenizer, ids that fit the vocabulary, at least one window each."""
    train_tokens, train_meta = load_tokens(config.data.train_tokens)
    val_tokens, val_meta = load_tokens(config.data.val_tokens)
    tokenizer = Tokenizer.load(config.data.tokenizer)
    window = config.model.context_length + 1
    for tokens, meta, name in ((train_tokens, train_meta, config.data.train_tokens),
                               (val_tokens, val_meta, config.data.val_tokens)):  # fmt: skip
        if meta["tokenizer"] != tokenizer.fingerprint:
            raise ScratchLMError(
                f"{name} was encoded with tokenizer {meta['tokenizer']}, but data.tokenizer "
                f"({config.data.tokenizer}) is {tokenizer.fingerprint}: re-encode or fix the config"
            )
        if len(tokens) < window:
            raise ScratchLMError(
                f"{name} holds {len(tokens):,} tokens: too few for one window of model.context_length "
                f"{config.model.context_length} + 1; give more text or a shorter context"
            )
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ScratchLMError(
            f"model.vocab_size is {config.model.vocab_size} but the tokenizer has {tokenizer.vocab_size} tokens"
        )
    return train_tokens, val_tokens, tokenizer


def restore(model, state: dict, path: Path, config: TrainConfig, optimizer=None) -> None:
    """Load a checkpoint's weights (and optimizer state) into the built model, after checking that it
    was made with this model shape (and this optimizer)."""
    check_compatible(state, config, path, ("model", "optim") if optimizer is not None else ("model",))
    try:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ScratchLMError(f"{path} does not fit this model: {reason}") from None


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

    def mfu(self, flops_per_s: float, say) -> float:
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


def train(config: TrainConfig, fresh: bool = False, quiet: bool = False) -> dict:
    """Train (or resume) the run in `config.out_dir`; returns the final metrics. The run directory is
    locked while it trains: a second `train` on it stops with a message naming the first."""
    setup_cpu(config)
    device = resolve_device(config.device)
    data = load_data(config)
    run_dir = Path(config.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ScratchLMError(f"out_dir {run_dir} exists and is not a directory")
    check_writable(run_dir)
    with directory_lock(run_dir):
        for directory in (run_dir, run_dir / "checkpoints"):
            remove_stale_temporaries(directory)  # left by a process killed mid-write; we hold the lock
        return _train(config, device, data, fresh, (lambda *a, **k: None) if quiet else print)


def _train(config: TrainConfig, device: torch.device, data: tuple, fresh: bool, say) -> dict:
    run_dir = Path(config.out_dir)
    train_tokens, val_tokens, tokenizer = data
    byte_lengths = token_byte_lengths(tokenizer, config.model.vocab_size, device)

    model = build_model(config, device)
    optimizer = build_optimizer(config, model)
    sampler = BatchSampler(train_tokens, config.batch_size, config.model.context_length, config.seed + 1, device)
    step, total_steps, elapsed_before = 0, config.max_steps, 0.0

    checkpoint = None if fresh else latest_checkpoint(run_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        restore(model, state, checkpoint, config, optimizer)
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        step, elapsed_before = state["step"], state["elapsed_s"]
        # A budgeted run keeps the step count it fitted; otherwise max_steps may extend a finished run.
        total_steps = state["total_steps"] if config.max_minutes else config.max_steps
        say(f"resuming {run_dir} from {checkpoint.name} (step {step} of {total_steps})")
    elif fresh and (run_dir / "checkpoints").exists():
        for old in (run_dir / "checkpoints").glob("*"):
            old.unlink()
    # A resumed run keeps the metrics up to its checkpoint and drops any logged after it.
    records = read_metrics(run_dir / "metrics.jsonl", up_to_step=step if checkpoint else -1)
    atomic_write_text(run_dir / "config.toml", to_toml(config))
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    log = MetricsLog(run_dir / "metrics.jsonl")

    loss_fn = torch.compile(model.loss) if should_compile(config, device) else model.loss
    tokens_per_step = config.tokens_per_step
    flops_per_token = training_flops_per_token(config.model)
    peak = PeakFlops(device, "bf16" if uses_bf16_autocast(config, device) else "fp32")
    budget_s = config.max_minutes * 60
    say(
        f"model: {model.num_parameters():,} parameters on {device} ({torch.get_num_threads()} threads); "
        f"{tokens_per_step:,} tokens/step; {flops_per_token / 1e6:.1f} MFLOP/token; MFU against {peak.name}"
    )

    def state_dict() -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sampler": sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,  # dropout's masks
            "step": step,
            "total_steps": total_steps,
            "elapsed_s": elapsed_before + (time.perf_counter() - start),
            "config": to_toml(config),
        }

    final: dict = {}
    first_step = step
    start = time.perf_counter()
    window_start, window_tokens = start, 0
    fitted_at = (start, step)  # (time, step) of the last fit of total_steps to the budget
    probe_step = WARMUP_STEPS + BUDGET_PROBE_STEPS  # a fresh run's first fit
    finite = torch.ones((), dtype=torch.bool, device=device)  # every loss since `checked_step` was finite
    checked_step = step
    model.train()
    with _StopFlag() as stop:
        while step < total_steps:
            lr = cosine_lr(step, config.optim.lr, config.optim.min_lr, config.optim.warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for _ in range(config.grad_accum_steps):
                x, y = sampler.next()
                with autocast(config, device):
                    loss = loss_fn(x, y) / config.grad_accum_steps
                loss.backward()
                loss_sum += loss.detach()
            finite &= loss_sum.isfinite()
            grad_norm = clip_grad_norm(model.parameters(), config.optim.grad_clip) if config.optim.grad_clip else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_tokens += tokens_per_step

            stopping = stop.signal is not None
            probe = checkpoint is None and step == probe_step
            fitted_once = checkpoint is not None or step > probe_step
            refit = step % config.eval_every == 0 and fitted_once
            log_due = step % config.log_every == 0 or step == total_steps
            eval_due = step % config.eval_every == 0 or step == total_steps
            save_due = step % config.checkpoint_every == 0 or step == total_steps or stopping
            if not (log_due or eval_due or save_due or probe or refit or step == first_step + WARMUP_STEPS):
                continue  # nothing to read: a GPU may run these steps while Python queues the next ones
            # The loop waits for the device only here, so the losses are checked here: before anything is
            # logged or saved, so a non-finite loss never reaches a checkpoint.
            loss_value = loss_sum.item()
            if not finite.item():
                last = latest_checkpoint(run_dir)
                raise ScratchLMError(
                    f"the training loss was not finite in steps {checked_step + 1}-{step} (now {loss_value}): "
                    f"stopped without saving; the last good checkpoint is {last or 'none (no checkpoint yet)'}. "
                    "Try a lower optim.lr."
                )
            checked_step = step
            now = time.perf_counter()
            elapsed = elapsed_before + (now - start)

            if step == first_step + WARMUP_STEPS:
                fitted_at = (now, step)  # the pace is timed from here, after the warm-up steps
            refit = refit or (fitted_once and now - fitted_at[0] >= REFIT_FRACTION * budget_s)
            if budget_s and step < total_steps and (probe or refit) and step > fitted_at[1]:
                # Fit the schedule to the wall-clock budget from the pace since the last fit (evaluations
                # and checkpoints included): first after a few warm steps, then at every evaluation (and
                # every tenth of the budget), so a run still ends on budget when the machine slows down or
                # speeds up, or when the first steps ran at a busy moment. The cosine schedule follows the
                # new length from here on.
                per_step = (now - fitted_at[0]) / (step - fitted_at[1])
                fitted = steps_for_budget(budget_s, elapsed, step, per_step, config.max_steps)
                if probe or abs(fitted - total_steps) > 0.01 * total_steps:
                    say(f"budget: {elapsed / 60:.1f} of {config.max_minutes:g} min used at {per_step:.3f} s/step "
                        f"-> {fitted} steps")  # fmt: skip
                total_steps, fitted_at = fitted, (now, step)

            if log_due:
                tokens_per_s = window_tokens / (now - window_start)
                mfu = peak.mfu(tokens_per_s * flops_per_token, say)
                record = {"step": step, "time_s": round(elapsed, 3), "train/loss": loss_value, "lr": lr,
                          "perf/tokens_per_s": tokens_per_s, "perf/mfu": mfu}  # fmt: skip
                if grad_norm is not None:
                    record["train/grad_norm"] = float(grad_norm)
                log.write(record)
                eta = (total_steps - step) * (now - start) / (step - first_step)
                say(
                    f"step {step:>6}/{total_steps}  loss {loss_value:.4f}  lr {lr:.2e}  "
                    f"{tokens_per_s:,.0f} tok/s  MFU {mfu:.1%}  ETA {format_eta(eta)}",
                    flush=True,
                )
                window_start, window_tokens = time.perf_counter(), 0

            if eval_due:
                result = evaluate(model, val_tokens, byte_lengths, config, device)
                record = {"step": step, "time_s": round(elapsed, 3), "val/loss": result.loss,
                          "val/perplexity": result.perplexity, "val/bpb": result.bits_per_byte}  # fmt: skip
                log.write(record)
                final = record
                say(f"  validation: loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
                    f"bits/byte {result.bits_per_byte:.4f}  ({result.tokens:,} tokens)")  # fmt: skip
                window_start = time.perf_counter()

            if save_due:
                path = save_checkpoint(run_dir, step, state_dict())
                if stopping:
                    say(f"saved {path}; resume with the same command")
                window_start = time.perf_counter()
            if stopping:
                break
    log.close()
    plot_losses(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png")
    return {"step": step, "total_steps": total_steps, "interrupted": stop.signal is not None, **final}
