"""`scratchlm bench` end to end: build each configuration, time its modes, and optionally profile it and
measure its memory; then a table (or JSON)."""

from __future__ import annotations

from pathlib import Path

import torch

from scratchlm import accounting
from scratchlm.bench.memory import cuda_peak_and_snapshot, saved_for_backward
from scratchlm.bench.profile import profile_mode
from scratchlm.bench.sizes import SIZES
from scratchlm.bench.timing import Workload, time_mode
from scratchlm.train.config import TrainConfig, load_config


def size_overrides(name: str) -> list[str]:
    """A named size as `--set` overrides of the default training config."""
    size = SIZES[name]
    m = size.model()
    return [f"model.{key}={getattr(m, key)}" for key in ("vocab_size", "context_length", "d_model", "n_layers",
            "n_heads", "d_ff")] + [f"batch_size={size.batch}"]  # fmt: skip


def resolve(config_path: str | None, size: str | None, sets: list[str], batch: int | None, context: int | None):
    """The TrainConfig to benchmark: a size or a TOML config, then --set, --batch and --context."""
    overrides = [*(size_overrides(size) if size else []), *sets]
    overrides += [f"batch_size={batch}"] if batch else []
    overrides += [f"model.context_length={context}"] if context else []
    return load_config(config_path, overrides)


def measure_memory(workload: Workload, snapshot: Path | None) -> dict:
    """Saved-for-backward bytes by kind, measured and predicted; on CUDA the peak of a full step."""
    m, batch = workload.config.model, workload.config.batch_size
    with workload.autocast():
        measured = saved_for_backward(workload.model, workload.token_ids, workload.targets)
    workload.optimizer.zero_grad(set_to_none=True)
    precision = "fp32" if workload.dtype == "fp32" else "bf16-mixed"
    width = 4 if precision == "fp32" else 2
    device = workload.device.type
    predicted = {
        kind: n * width
        for kind, n in accounting.activation_elements(m, batch, m.context_length, device, precision).items()
    }
    predicted["dropout masks"] = accounting.dropout_mask_bytes(m, batch, m.context_length)
    estimate = accounting.memory_estimate(m, batch, m.context_length, precision, device)
    result = {"saved_measured": measured, "saved_predicted": predicted, "predicted_total": estimate.total,
              "predicted_recompute": estimate.recompute}  # fmt: skip
    if workload.device.type == "cuda":
        result["cuda_peak_bytes"] = cuda_peak_and_snapshot(lambda: workload.run("step"), snapshot)
        result["snapshot"] = str(snapshot) if snapshot else None
    return result


def bench_one(
    name: str, config: TrainConfig, device: torch.device, modes: list[str], dtype: str, compiled: bool,
    warmup: int, steps: int, profile: bool, memory: bool, out: Path,
) -> dict:  # fmt: skip
    workload = Workload(config, device, dtype, compiled)
    m = config.model
    result = {
        "name": name, "device": str(device), "dtype": dtype, "compile": compiled, "batch": config.batch_size,
        "context": m.context_length, "parameters": accounting.parameter_counts(m)["total"],
        "activation_checkpointing": m.activation_checkpointing,
        "timings": [time_mode(workload, mode, warmup, steps).as_dict() for mode in modes],
    }  # fmt: skip
    slug = name.replace("/", "_")
    if profile:
        result["profile"] = profile_mode(workload, modes[-1], max(1, min(steps, 3)), out / f"{slug}-trace.json")
    if memory:
        result["memory"] = measure_memory(workload, out / f"{slug}-memory.pickle")
    return result


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.2f} MiB"


HEADER = (f"{'size':<12} {'params':>9} {'batch x ctx':>12} {'dtype':>5} {'mode':>17} {'mean ms':>10} {'std ms':>8} "
          f"{'tokens/s':>11} {'MFU':>7}")  # fmt: skip


def format_timings(result: dict) -> list[str]:
    """One row per timed mode, under `HEADER`."""
    r = result
    return [
        f"{r['name']:<12} {r['parameters'] / 1e6:>8.1f}M {r['batch']:>5} x {r['context']:<5} {r['dtype']:>5} "
        f"{t['mode']:>17} {_ms(t['mean_s']):>10} {_ms(t['std_s']):>8} {t['tokens_per_s']:>11,.0f} {t['mfu']:>7.1%}"
        for t in r["timings"]
    ]


def format_details(result: dict) -> list[str]:
    """The profile's top operators and the memory by kind, where they were asked for."""
    r, lines = result, []
    if "profile" in r:
        p = r["profile"]
        lines += ["", f"{r['name']}: top operators by self time ({p['total_ms']:,.1f} ms a run, "
                  f"{p['matmul_share']:.1%} in matmuls); trace: {p['trace']}"]  # fmt: skip
        for row in p["rows"]:
            lines.append(
                f"  {row['name'][:60]:<60} {row['calls']:>6} calls {row['self_ms']:>9.2f} ms {row['share']:>7.1%}"
            )
    if "memory" in r:
        mem = r["memory"]
        lines += ["", f"{r['name']}: saved for backward by kind ({r['dtype']}, batch {r['batch']} x {r['context']})",
                  f"  {'kind':<28} {'measured':>12} {'predicted':>12}"]  # fmt: skip
        for kind, measured in mem["saved_measured"].items():
            predicted = mem["saved_predicted"].get(kind)
            lines.append(f"  {kind:<28} {_mib(measured):>12} {'-' if predicted is None else _mib(predicted):>12}")
        total_measured, total_predicted = sum(mem["saved_measured"].values()), sum(mem["saved_predicted"].values())
        lines.append(f"  {'total':<28} {_mib(total_measured):>12} {_mib(total_predicted):>12}")
        if mem["predicted_recompute"]:
            lines.append(
                f"  recomputed in backward, one checkpointed block at a time: {_mib(mem['predicted_recompute'])}"
            )
        if "cuda_peak_bytes" in mem:
            peak, predicted = mem["cuda_peak_bytes"] / 2**30, mem["predicted_total"] / 2**30
            lines.append(f"  CUDA peak allocated in a step: {peak:,.2f} GiB (predicted {predicted:,.2f} GiB)")
            lines.append(f"  memory snapshot (https://pytorch.org/memory_viz): {mem['snapshot']}")
    return lines
