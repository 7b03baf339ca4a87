"""`scratchlm account`: the accounting of a configuration as readable tables or JSON."""

from __future__ import annotations

from dataclasses import asdict, replace

from scratchlm import accounting
from scratchlm.model.config import ModelConfig

PRECISIONS = ("fp32", "bf16-mixed")


def account(
    config: ModelConfig,
    batch: int,
    seq: int,
    device: str,
    mfu: float,
    tokens: float,
    memory_gb: float,
    optimizer: str = "adamw",
) -> dict:
    params = accounting.parameter_counts(config)
    precision_dtype = "fp32" if device == "cpu" else "bf16"
    peak = accounting.device_peak_flops(device, precision_dtype)
    device_type = "cpu" if device == "cpu" else "cuda"
    memory = {p: asdict(accounting.memory_estimate(config, batch, seq, p, device_type, optimizer)) for p in PRECISIONS}
    for p in memory:
        memory[p]["total"] = sum(memory[p].values())
    return {
        "model": asdict(config),
        "optimizer": optimizer,
        "batch": batch,
        "seq": seq,
        "parameters": params,
        "forward_flops": accounting.forward_flops(config, batch, seq),
        "training_flops": accounting.training_flops(config, batch, seq),
        "flops_per_token": accounting.training_flops_per_token(config),
        "memory_bytes": memory,
        "time": {
            "device": device,
            "peak_flops": peak,
            "mfu": mfu,
            "tokens": tokens,
            "seconds": accounting.training_time_s(config, tokens, peak, mfu),
        },
        "largest_batch": {
            "memory_gb": memory_gb,
            **{
                p: accounting.largest_batch(config, seq, memory_gb * 2**30, p, device_type, optimizer)
                for p in PRECISIONS
            },
            "by_activation_checkpointing": {
                mode: {
                    p: accounting.largest_batch(
                        replace(config, activation_checkpointing=mode),
                        seq,
                        memory_gb * 2**30,
                        p,
                        device_type,
                        optimizer,
                    )
                    for p in PRECISIONS
                }
                for mode in dict.fromkeys(("none", "blocks", config.activation_checkpointing))
            },
        },
    }


def _si(x: float, unit: str = "") -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:,.2f} {prefix}{unit}"
    return f"{x:,.0f} {unit}".rstrip()


def _gib(x: float) -> str:
    return f"{x / 2**30:,.2f} GiB"


def format_account(report: dict) -> str:
    m, params = report["model"], report["parameters"]
    lines = [
        f"model: d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']} heads ({m['n_kv_heads']} kv), "
        f"d_ff {m['d_ff']}, vocab {m['vocab_size']:,}, context {m['context_length']}; "
        f"batch {report['batch']} x seq {report['seq']}",
        "",
        "parameters",
        *(f"  {k:<34} {v:>16,}  {v / params['total']:6.1%}" for k, v in params.items()),
        "",
        "forward FLOPs (2 per multiply-add)",
        *(f"  {k:<34} {_si(v, 'FLOP'):>16}" for k, v in report["forward_flops"].items()),
    ]
    t = report["training_flops"]
    lines += [
        f"  {'training step (3 x forward)':<34} {_si(t['step'], 'FLOP'):>16}",
        f"  {'6 N T rule of thumb':<34} {_si(t['6NT'], 'FLOP'):>16}  ({t['6NT / exact']:.1%} of exact)",
        f"  {'per trained token':<34} {_si(report['flops_per_token'], 'FLOP'):>16}",
        "",
        f"{'memory for training with ' + report['optimizer']:<36} {'fp32':>16} {'bf16-mixed':>16}",
    ]
    mem = report["memory_bytes"]
    for kind in ("parameters", "gradients", "optimizer", "activations", "recompute", "total"):
        lines.append(f"  {kind:<34} {_gib(mem['fp32'][kind]):>16} {_gib(mem['bf16-mixed'][kind]):>16}")
    tm, lb = report["time"], report["largest_batch"]
    hours = tm["seconds"] / 3600
    lines += [
        "",
        f"time for {_si(tm['tokens'], 'tokens')} on {tm['device']} (peak {_si(tm['peak_flops'], 'FLOP/s')}) "
        f"at {tm['mfu']:.0%} MFU: {hours:,.2f} hours",
        f"largest batch (seq {report['seq']}) in {lb['memory_gb']:g} GiB: "
        f"fp32 {lb['fp32']}, bf16-mixed {lb['bf16-mixed']}",
        *(
            f"  with activation_checkpointing = {mode!r}: fp32 {n['fp32']}, bf16-mixed {n['bf16-mixed']}"
            for mode, n in lb["by_activation_checkpointing"].items()
        ),
    ]
    return "\n".join(lines)
