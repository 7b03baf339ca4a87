"""The training loop, composed of the trainer's parts: the run's setup (`setup`), the step (`step`), the
budget clock (`budget`), the schedule (`optim.schedule`), evaluation (`evaluate`), checkpoints
(`checkpoint`) and the log (`progress`). Later stages (distributed runs, fine-tuning) compose the same
parts.

A run directory holds `config.toml`, `metrics.jsonl`, `loss.png` and `checkpoints/`. Starting a run
whose directory has a checkpoint continues it from there: same model, optimizer, step, schedule and
data stream, so the loss trajectory is the one an uninterrupted run would have had (bit for bit on CPU).
Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and stops. A non-finite loss stops
the run without saving, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from scratchlm.accounting import training_flops_per_token
from scratchlm.atomic import atomic_write_text, check_writable, remove_stale_temporaries
from scratchlm.data.loader import BatchSampler, resolve_device
from scratchlm.distributed import group, make_strategy
from scratchlm.distributed.base import Strategy
from scratchlm.distributed.checkpoint import save_sharded_checkpoint
from scratchlm.errors import ScratchLMError
from scratchlm.lock import directory_lock
from scratchlm.optim.schedule import DecaySchedule
from scratchlm.train.budget import BudgetClock
from scratchlm.train.checkpoint import latest_checkpoint, read_checkpoint, save_run_checkpoint
from scratchlm.train.config import TrainConfig, to_toml
from scratchlm.train.evaluate import evaluate, token_byte_lengths
from scratchlm.train.metrics import MetricsLog, NullLog, plot_losses, read_metrics
from scratchlm.train.progress import PeakFlops, Progress
from scratchlm.train.setup import (
    build_model,
    build_optimizer,
    load_data,
    restore,
    setup_cpu,
    should_compile,
    uses_bf16_autocast,
)
from scratchlm.train.signals import StopFlag
from scratchlm.train.step import TrainStep


def train(config: TrainConfig, fresh: bool = False, quiet: bool = False) -> dict:
    """Train (or resume) the run in `config.out_dir`; returns the final metrics. The run directory is
    locked while it trains: a second `train` on it stops with a message naming the first.

    Under `scratchlm train --nproc N` or torchrun, each process joins the process group and trains its
    part with `config.parallel.strategy`; rank 0 prints and writes the metrics, and every rank writes its
    part of each checkpoint (`scratchlm.distributed.checkpoint`).
    """
    rank = group.from_environment()
    setup_cpu(config, int(os.environ.get("LOCAL_WORLD_SIZE", rank.world_size)))
    device = resolve_device(config.device)
    if device.type == "cuda" and rank.world_size > 1:
        device = torch.device("cuda", rank.local_rank)
    data = load_data(config)
    run_dir = Path(config.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ScratchLMError(f"out_dir {run_dir} exists and is not a directory")
    check_writable(run_dir)
    say = (lambda *a, **k: None) if quiet or not rank.is_main else print
    group.join(rank, device.type)
    try:
        with directory_lock(run_dir) if rank.is_main else contextlib.nullcontext():
            if rank.is_main:
                for directory in (run_dir, run_dir / "checkpoints"):
                    remove_stale_temporaries(directory)  # left by a process killed mid-write; we hold the lock
            return _train(config, device, data, fresh, say, rank)
    finally:
        group.leave()


def _train(config: TrainConfig, device: torch.device, data: tuple, fresh: bool, say, rank: group.Rank) -> dict:
    run_dir = Path(config.out_dir)
    train_tokens, val_tokens, tokenizer = data
    byte_lengths = token_byte_lengths(tokenizer, config.model.vocab_size, device)
    model = build_model(config, device)
    strategy = make_strategy(config.parallel, model) if rank.world_size > 1 else Strategy(model)
    optimizer = strategy.optimizer(lambda m, spec=False: build_optimizer(config, m, spec))
    sampler = BatchSampler(train_tokens, config.batch_size, config.model.context_length, config.seed + 1, device,
                           rank.rank, rank.world_size)  # fmt: skip
    o = config.optim
    schedule = DecaySchedule(o.lr, o.min_lr, o.warmup_steps, shape=o.decay, cooldown=o.cooldown)
    step, total_steps, elapsed_before = 0, config.max_steps, 0.0

    checkpoint = None if fresh else latest_checkpoint(run_dir)
    if checkpoint is not None:
        state = read_checkpoint(checkpoint)
        restore(model, state, checkpoint, config, optimizer, strategy)
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        step, elapsed_before = state["step"], state["elapsed_s"]
        # A budgeted run keeps the step count it fitted and its place in the decay; otherwise max_steps may
        # extend a finished run, and the schedule follows the new length.
        if config.max_minutes:
            total_steps, schedule.position = state["total_steps"], state.get("lr_position", 0.0)
        say(f"resuming {run_dir} from {checkpoint.name} (step {step} of {total_steps})")
    elif fresh and rank.is_main and (run_dir / "checkpoints").exists():
        for old in (run_dir / "checkpoints").glob("*"):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    if rank.is_main:
        # A resumed run keeps the metrics up to its checkpoint and drops any logged after it.
        records = read_metrics(run_dir / "metrics.jsonl", up_to_step=step if checkpoint else -1)
        atomic_write_text(run_dir / "config.toml", to_toml(config))
        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    compiled = torch.compile(model.loss) if should_compile(config, device) and rank.world_size == 1 else None
    train_step = TrainStep(strategy, optimizer, config, device, compiled)
    flops_per_token = training_flops_per_token(config.model)
    peak = PeakFlops(device, "bf16" if uses_bf16_autocast(config, device) else "fp32")
    world = f"; {rank.world_size} processes ({config.parallel.strategy})" if rank.world_size > 1 else ""
    tokens_per_step = config.tokens_per_step * rank.world_size
    say(
        f"model: {model.num_parameters():,} parameters on {device} ({torch.get_num_threads()} threads){world}; "
        f"{tokens_per_step:,} tokens/step; {flops_per_token / 1e6:.1f} MFLOP/token; MFU against {peak.name}"
    )
    start = time.perf_counter()
    clock = BudgetClock(config, step, total_steps, resumed=checkpoint is not None, now=start)
    log = MetricsLog(run_dir / "metrics.jsonl") if rank.is_main else NullLog()
    # MFU per process: its own tokens against its own device's peak.
    progress = Progress(log, peak, flops_per_token, config.tokens_per_step, step, start, say)

    def save() -> Path:
        run_state = {
            "sampler": sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,  # dropout's masks
            "step": step,
            "total_steps": clock.total_steps,
            "lr_position": schedule.position,
            "elapsed_s": elapsed_before + (time.perf_counter() - start),
            "config": to_toml(config),
            "world_size": rank.world_size,
        }
        if rank.world_size > 1:  # every rank writes its part (collective)
            return save_sharded_checkpoint(run_dir, step, strategy, optimizer, run_state)
        return save_run_checkpoint(run_dir, step, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                   **run_state})  # fmt: skip

    final: dict = {}
    checked_step, stopping = step, False
    model.train()
    with StopFlag() as stop:
        while step < clock.total_steps:
            lr = schedule(step, clock.total_steps)
            loss, grad_norm = train_step(sampler, lr)
            step += 1
            progress.step_done()

            stopping = agree(stop.signal is not None, rank)
            total = clock.total_steps
            log_due = step % config.log_every == 0 or step == total
            eval_due = step % config.eval_every == 0 or step == total
            save_due = step % config.checkpoint_every == 0 or step == total or stopping
            if not (log_due or eval_due or save_due or clock.needs_time(step)):
                continue  # nothing to read: a GPU may run these steps while Python queues the next ones
            loss_value = train_step.checked_loss(loss, checked_step, step, lambda: latest_checkpoint(run_dir))
            checked_step = step
            now = time.perf_counter()
            elapsed = elapsed_before + (now - start)
            clock.update(step, now, elapsed, say)
            clock.total_steps = rank_zeros(clock.total_steps, rank)  # every rank stops at the same step
            if log_due:
                progress.train(step, clock.total_steps, elapsed, loss_value, lr, grad_norm, now)
            if eval_due:
                result = evaluate(model, val_tokens, byte_lengths, config, device, strategy)
                final = progress.evaluation(step, elapsed, result)
            if save_due:
                path = save()
                if stopping:
                    say(f"saved {path}; resume with the same command")
            if log_due or eval_due or save_due:
                progress.paused(now, time.perf_counter())
            if stopping:
                break
    log.close()
    if rank.is_main:
        plot_losses(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png")
    return {"step": step, "total_steps": clock.total_steps, "interrupted": stopping, **final}


def agree(flag: bool, rank: group.Rank) -> bool:
    """Whether any rank has `flag` set (all of them stop when one was interrupted)."""
    if rank.world_size == 1:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def rank_zeros(value: int, rank: group.Rank) -> int:
    """Rank 0's `value` on every rank (the step count its clock fitted)."""
    if rank.world_size == 1:
        return value
    tensor = torch.tensor([value])
    dist.broadcast(tensor, src=0)
    return int(tensor.item())
