"""The loop of an alignment stage, composed of the trainer's parts: the run directory's lock and stale
temporaries, the optimizer builder and the cosine schedule, atomic checkpoints with a `latest` pointer,
`metrics.jsonl`, Ctrl-C / SIGTERM handling (finish the step, save, stop) and the gradient clipping of
the single-process strategy.

An alignment run directory is a run directory like training's: `config.toml` is the model's training
config (so `scratchlm generate | serve | export --run` work on it), `align.toml` is the stage's config,
and its checkpoints hold the weights, the optimizer, the step and the stage's own state. Starting it
again resumes from its latest checkpoint; a finished stage returns at once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from scratchlm.align.config import AlignConfig
from scratchlm.align.evaluate import evaluate_task
from scratchlm.align.stages import STAGES
from scratchlm.align.tasks import reward_function, take_for
from scratchlm.atomic import atomic_write_text, check_writable, remove_stale_temporaries
from scratchlm.distributed.base import Strategy
from scratchlm.errors import ScratchLMError
from scratchlm.infer.generate import load_run
from scratchlm.lock import directory_lock
from scratchlm.optim.schedule import DecaySchedule
from scratchlm.train.checkpoint import latest_checkpoint, read_checkpoint, save_run_checkpoint
from scratchlm.train.config import to_toml
from scratchlm.train.metrics import MetricsLog, format_eta, read_metrics
from scratchlm.train.setup import build_optimizer, setup_cpu
from scratchlm.train.signals import StopFlag


def held_out_evaluation(model, tokenizer, config: AlignConfig, samples: int = 0) -> dict:
    t = config.task
    problems = take_for(t, tokenizer, "test", t.seed, config.eval_problems)
    result = evaluate_task(
        model, tokenizer, problems, reward_function(t.name), t.max_new_tokens, samples=samples, seed=config.seed
    )
    return result.as_dict()


def run_stage(config: AlignConfig, fresh: bool = False, quiet: bool = False) -> dict:
    """Run (or resume) the stage in `config.out_dir` from the model of `config.init`; returns the final
    metrics (the last held-out evaluation among them)."""
    say = (lambda *a, **k: None) if quiet else print
    run_dir = Path(config.out_dir)
    if Path(config.init).resolve() == run_dir.resolve():
        raise ScratchLMError(f"init and out_dir are both {run_dir}: a stage writes a new run beside its start")
    check_writable(run_dir)
    with directory_lock(run_dir):
        for directory in (run_dir, run_dir / "checkpoints"):
            remove_stale_temporaries(directory)
        return _run(config, fresh, say)


def _run(config: AlignConfig, fresh: bool, say) -> dict:
    run_dir = Path(config.out_dir)
    model, tokenizer, train_config, _ = load_run(config.init)
    setup_cpu(dataclasses.replace(train_config, threads=config.threads))
    reference = None
    stage = STAGES[config.stage](config, model, tokenizer)
    if stage.needs_reference:
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        stage.reference = reference
    optimizer = build_optimizer(dataclasses.replace(train_config, optim=config.optim), model)
    o = config.optim
    schedule = DecaySchedule(o.lr, o.min_lr, o.warmup_steps, shape=o.decay, cooldown=o.cooldown)
    strategy = Strategy(model)
    step, elapsed_before, flops = 0, 0.0, 0.0
    checkpoint = None if fresh else latest_checkpoint(run_dir)
    if checkpoint is not None:
        state = read_checkpoint(checkpoint)
        saved_stage = state.get("align_stage")
        if saved_stage != config.stage:
            raise ScratchLMError(
                f"{checkpoint} is a {saved_stage} checkpoint, not {config.stage}: use another out_dir or --fresh"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stage.load_state_dict(state["stage"])
        torch.set_rng_state(state["torch_rng"])
        step, elapsed_before, flops = state["step"], state["elapsed_s"], state["flops"]
        say(f"resuming {run_dir} from {checkpoint.name} (step {step} of {config.steps})")
    elif fresh and (run_dir / "checkpoints").exists():
        for old in (run_dir / "checkpoints").glob("step_*"):
            old.unlink()
    records = read_metrics(run_dir / "metrics.jsonl", up_to_step=step if checkpoint else -1)
    atomic_write_text(run_dir / "config.toml", to_toml(train_config))
    atomic_write_text(run_dir / "align.toml", to_toml(config))
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    log = MetricsLog(run_dir / "metrics.jsonl")
    say(
        f"align {config.stage}: {model.num_parameters():,} parameters from {config.init}; {config.steps} steps "
        f"of {config.batch_size}; task {config.task.name} ({config.task.digits} digits)"
    )
    start = time.perf_counter()

    def evaluation() -> dict:
        result = held_out_evaluation(model, tokenizer, config)
        record = {
            "step": step,
            "time_s": round(elapsed_before + time.perf_counter() - start, 3),
            "eval/accuracy": result["greedy_accuracy"],
            "eval/format": result["format_rate"],
            "eval/entropy": result["token_entropy"],
        } | stage.evaluate()
        log.write(record)
        extra = "".join(f"  {k.removeprefix('eval/')} {v:.3f}" for k, v in record.items() if k.startswith("eval/"))
        say(f"  held-out (step {step}):{extra}", flush=True)
        return record

    def save() -> Path:
        return save_run_checkpoint(
            run_dir,
            step,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "stage": stage.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "elapsed_s": elapsed_before + time.perf_counter() - start,
                "config": to_toml(train_config),
                "align": to_toml(config),
                "align_stage": config.stage,
                "flops": flops,
            },
        )

    def update() -> float:
        norm = strategy.clip(config.optim.grad_clip) if config.optim.grad_clip else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm) if norm is not None else 0.0

    final: dict = {}
    stopping = False
    if checkpoint is None:
        stage.prepare(say)
        final = evaluation()
    model.train()
    first_step = step
    with StopFlag() as stop:
        while step < config.steps:
            lr = schedule(step, config.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            metrics = stage.step(step, update)
            flops += metrics.pop("flops")
            step += 1
            stopping = stop.signal is not None
            for key, value in metrics.items():
                if isinstance(value, float) and not torch.isfinite(torch.tensor(value)):
                    raise ScratchLMError(
                        f"{key} was {value} at step {step}: stopped without saving; the last good "
                        f"checkpoint is {latest_checkpoint(run_dir) or 'none'}. Try a lower optim.lr"
                    )
            elapsed = elapsed_before + time.perf_counter() - start
            if step % config.log_every == 0 or step == config.steps:
                log.write({"step": step, "time_s": round(elapsed, 3), "lr": lr, "compute/flops": flops} | metrics)
                eta = (config.steps - step) * (time.perf_counter() - start) / (step - first_step)
                shown = "  ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items() if k != "train/grad_norm")
                say(f"step {step:>5}/{config.steps}  {shown}  lr {lr:.2e}  ETA {format_eta(eta)}", flush=True)
            if step % config.eval_every == 0 or step == config.steps:
                final = evaluation()
                model.train()
            if step % config.checkpoint_every == 0 or step == config.steps or stopping:
                path = save()
                if stopping:
                    say(f"saved {path}; resume with the same command")
                    break
    log.close()
    plot_curves(read_metrics(run_dir / "metrics.jsonl"), run_dir / "curves.png", f"align {config.stage}")
    if not final:  # a finished run started again: its last evaluation
        final = next((r for r in reversed(read_metrics(run_dir / "metrics.jsonl")) if "eval/accuracy" in r), {})
    return {"step": step, "interrupted": stopping, "flops": flops} | final


def plot_curves(records: list[dict], path: Path, title: str) -> None:
    """Training reward / loss and held-out accuracy against steps, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scratchlm.atomic import atomic_open

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train/reward", "train/loss"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axes[0].plot(*zip(*points, strict=True), label=key, lw=1)
    for key in ("eval/accuracy", "eval/format", "eval/preference_accuracy"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axes[1].plot(*zip(*points, strict=True), "o-", label=key, ms=3)
    for ax, label in zip(axes, ("training", "held-out"), strict=True):
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
