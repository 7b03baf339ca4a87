"""`scratchlm speedrun`: raw text -> tokenizer -> token arrays -> trained model -> samples -> report.md.

Stages, each cached by its inputs so a second run skips what has not changed and an interrupted run
resumes where it stopped:
  1. corpus        the embedded Shakespeare works, or the user's files / folder
  2. split         by document, deterministic (data/split.json records the inputs it was made from)
  3. tokenizer     BPE trained on the training documents, both splits encoded to uint16 arrays
  4. accounting    parameters, FLOPs, memory; predicted tokens/s and MFU for the budget
  5. training      for the time budget, resuming from the run's checkpoint if there is one
  6. evaluation    validation loss and bits per byte, and samples from fixed prompts
  7. report        report.md with environment, tokenizer statistics, accounting, predicted vs measured,
                   loss curves, final metrics, samples, and the commands to go on from here
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scratchlm import __version__, accounting
from scratchlm.atomic import atomic_write_text
from scratchlm.data.encode import load_tokens
from scratchlm.data.prepare import prepare
from scratchlm.data.sources import resolve_corpus
from scratchlm.errors import ScratchLMError
from scratchlm.train.config import TrainConfig, load_config, to_toml
from scratchlm.train.trainer import uses_bf16_autocast

# Presets: overrides of the TrainConfig defaults, plus the MFU the accounting predicts with (measured
# on the machines named in docs/benchmarks.md). "cpu" is configs/shakespeare-cpu.toml (tested equal).
# "max_epochs" caps the passes over the training tokens, whatever the budget: an H100 runs ~250 passes
# over Shakespeare's 1.4M tokens in 10 minutes, and without dropout and a cap the validation loss rose
# from 1.94 bits/byte (after 6 passes) to 4.06. Chosen by 1-minute trials (docs/benchmarks.md).
PRESETS: dict[str, dict] = {
    "cpu": {
        "expected_mfu": 0.62,  # 2-core EPYC, vocab 4,096, Muon: 55-60% at batch 16, 62-70% at 32
        "sets": [
            "model.vocab_size=4096",
            "model.context_length=128",
            "model.d_model=128",
            "model.n_layers=4",
            "model.n_heads=4",
            "batch_size=32",
            'optim.name="muon"',
            "optim.muon_lr=0.03",
            'optim.muon_dtype="bfloat16"',
            "optim.lr=6e-3",
            "optim.embedding_lr=0.03",
            "optim.min_lr=3e-4",
            "optim.warmup_steps=100",
            'optim.decay="linear"',
            "optim.cooldown=0.5",
            "eval_every=250",
            "eval_tokens=100000",
            "log_every=25",
            "checkpoint_every=250",
        ],
    },
    "gpu": {
        "expected_mfu": 0.30,
        "max_epochs": 16,
        "sets": [
            "model.vocab_size=10000",
            "model.context_length=512",
            "model.d_model=768",
            "model.n_layers=8",
            "model.n_heads=12",
            "model.dropout=0.3",
            "batch_size=64",
            "optim.lr=1e-3",
            "optim.min_lr=1e-4",
            "optim.warmup_steps=200",
            "eval_every=250",
            "eval_tokens=200000",
            "log_every=25",
            "checkpoint_every=250",
            'dtype="bfloat16"',
        ],
    },
    "tiny": {  # seconds, for smoke tests
        "expected_mfu": 0.1,
        "sets": [
            "model.vocab_size=300",
            "model.context_length=32",
            "model.d_model=32",
            "model.n_layers=1",
            "model.n_heads=2",
            "batch_size=4",
            "optim.warmup_steps=5",
            "eval_every=20",
            "eval_tokens=2048",
            "log_every=5",
            "checkpoint_every=20",
        ],
    },
}
SHAKESPEARE_PROMPTS = ["ROMEO.\n", "To be, or not to be", "KING HENRY.\nNow, lords,"]


@dataclass
class SpeedrunPaths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def report(self) -> Path:
        return self.root / "report.md"


def say(message: str) -> None:
    print(f"\n== {message}", flush=True)


def corpus_fingerprint(paths: list[Path], vocab_size: int, val_fraction: float) -> str:
    h = hashlib.sha256(f"{vocab_size}:{val_fraction}".encode())
    for p in paths:
        stat = p.stat()
        h.update(f"{p.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def stage_data(paths: list[Path], out: SpeedrunPaths, vocab_size: int, val_fraction: float) -> dict:
    key = corpus_fingerprint(paths, vocab_size, val_fraction)
    split_file = out.data / "split.json"
    if split_file.is_file():
        info = json.loads(split_file.read_text())
        if info.get("inputs") == key:
            print(f"cached: {out.data}/ (same corpus and vocabulary size)")
            return info
    return prepare(paths, out.data, vocab_size, val_fraction, extra={"inputs": key})


def build_config(preset: str, out: SpeedrunPaths, minutes: float, device: str) -> TrainConfig:
    p = out.data
    sets = [*PRESETS[preset]["sets"], f"max_minutes={minutes}", "max_steps=1000000", f'out_dir="{out.run}"',
            f'data.train_tokens="{p / "train.bin"}"', f'data.val_tokens="{p / "val.bin"}"',
            f'data.tokenizer="{p / "tokenizer"}"', f'device="{device}"']  # fmt: skip
    return load_config(None, sets)


def run_speedrun(
    corpus: str = "shakespeare",
    minutes: float = 10.0,
    out_dir: str | os.PathLike = "runs/speedrun",
    preset: str | None = None,
    device: str = "auto",
    nproc: int = 1,
) -> Path:
    from scratchlm.data.loader import resolve_device
    from scratchlm.infer.generate import Sampling, generate, load_run
    from scratchlm.train.evaluate import evaluate_run
    from scratchlm.train.trainer import train

    started = time.perf_counter()
    if not minutes > 0 or minutes == float("inf"):
        raise ScratchLMError(f"minutes: expected a finite number > 0, got {minutes!r}")
    torch_device = resolve_device(device)
    preset = preset or ("gpu" if torch_device.type == "cuda" else "cpu")
    if preset not in PRESETS:
        raise ScratchLMError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")
    out = SpeedrunPaths(Path(out_dir))

    say(f"1. corpus: {corpus}")
    paths = resolve_corpus(corpus)
    total = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} documents, {total / 1e6:.2f} MB")

    config = build_config(preset, out, minutes, str(torch_device))
    say("2-3. split by document, train the tokenizer, encode both splits")
    info = stage_data(paths, out, config.model.vocab_size, 0.05)
    print(f"train: {len(info['train']['documents'])} documents, {info['train']['tokens']:,} tokens; "
          f"validation: {len(info['val']['documents'])} documents, {info['val']['tokens']:,} tokens")  # fmt: skip
    if epochs := PRESETS[preset].get("max_epochs"):
        config.max_steps = steps_for_epochs(epochs, info["train"]["tokens"], config)
        print(f"at most {epochs} passes over the training tokens: {config.max_steps:,} steps")

    say(f"4. accounting ({preset} preset on {torch_device})")
    prediction = predict(config, torch_device, PRESETS[preset]["expected_mfu"], minutes)
    print(accounting_summary(config, prediction))

    say(f"5. training for {minutes:g} minutes (Ctrl-C saves a checkpoint; run the same command to resume)")
    if nproc > 1:  # the ranks run `scratchlm train` on the config the other stages use
        from scratchlm.distributed.group import launch

        atomic_write_text(out.root / "train.toml", to_toml(config))
        status = launch(nproc, ["train", "--config", str(out.root / "train.toml")])
        if status == 130:
            raise KeyboardInterrupt
        if status:
            raise SystemExit(status)  # the launcher said which rank failed and why
    elif train(config).get("interrupted"):
        raise KeyboardInterrupt

    say("6. evaluation and samples")
    evaluation = evaluate_run(out.run)
    print(f"validation loss {evaluation['loss']:.4f}, perplexity {evaluation['perplexity']:.2f}, "
          f"bits per byte {evaluation['bits_per_byte']:.4f}")  # fmt: skip
    model, tokenizer, _, _ = load_run(out.run)
    prompts = SHAKESPEARE_PROMPTS if corpus == "shakespeare" else _prompts_from(out.data, tokenizer)
    context = config.model.context_length
    prompts = [fit_prompt(tokenizer, p, max(1, context // 2)) for p in prompts]
    budget = max(1, min(120, context - max(len(tokenizer.encode(p)) for p in prompts)))
    samples, _ = generate(
        model, tokenizer, prompts, Sampling(temperature=0.8, top_p=0.95, max_new_tokens=budget, seed=0)
    )
    for s in samples:
        print(f"--- {s.prompt!r}\n{s.prompt}{s.text}")

    say("7. report")
    report = write_report(out, config, info, prediction, evaluation, samples, corpus, preset, minutes, started)
    print(f"wrote {report}")
    return report


def fit_prompt(tokenizer, prompt: str, max_tokens: int) -> str:
    """`prompt` cut from the left, at a word where it can be, to at most `max_tokens` tokens (at least
    one character stays), so that any preset's context holds it and a continuation."""
    words = prompt.split(" ")
    while len(words) > 1 and len(tokenizer.encode(" ".join(words))) > max_tokens:
        words = words[1:]
    text = " ".join(words)
    while len(text) > 1 and len(tokenizer.encode(text)) > max_tokens:
        text = text[1:]
    return text


def _prompts_from(data_dir: Path, tokenizer) -> list[str]:
    """The first few words of up to three validation documents."""
    text = tokenizer.decode(load_tokens(data_dir / "val.bin")[0][:2000].tolist())
    docs = [d for d in text.split("<|endoftext|>") if d.strip()][:3] or [text]
    return [" ".join(d.split()[:6]) for d in docs]


def steps_for_epochs(epochs: float, train_tokens: int, config: TrainConfig) -> int:
    """Steps that take `epochs` passes over `train_tokens` (at least one)."""
    return max(1, round(epochs * train_tokens / config.tokens_per_step))


def predict(config: TrainConfig, device: torch.device, mfu: float, minutes: float) -> dict:
    """Predicted tokens/s at `mfu`, and the tokens trained on: the budget's worth, or max_steps' if fewer."""
    peak = accounting.device_peak_flops(device, "bf16" if device.type == "cuda" else "fp32")
    per_token = accounting.training_flops_per_token(config.model)
    tokens_per_s = peak * mfu / per_token
    step_limit = config.max_steps * config.tokens_per_step
    return {"peak_flops": peak, "mfu": mfu, "flops_per_token": per_token, "tokens_per_s": tokens_per_s,
            "tokens": min(tokens_per_s * minutes * 60, step_limit)}  # fmt: skip


def training_precision(config: TrainConfig) -> str:
    """How `scratchlm train` runs this config (its device resolved, as the speedrun sets it), in the
    accounting's terms: "bf16-mixed" under autocast, else "fp32"."""
    return "bf16-mixed" if uses_bf16_autocast(config, torch.device(config.device)) else "fp32"


def training_memory(config: TrainConfig) -> accounting.MemoryEstimate:
    """The accounting's training memory for this config, a batch of whole contexts, as it will train."""
    m, device = config.model, torch.device(config.device).type
    return accounting.memory_estimate(
        m, config.batch_size, m.context_length, training_precision(config), device, config.optim.name
    )


def accounting_summary(config: TrainConfig, prediction: dict) -> str:
    m = config.model
    params = accounting.parameter_counts(m)
    precision, mem = training_precision(config), training_memory(config)
    mib = 2**20
    parts = ", ".join(f"{k} {v:,}" for k, v in params.items() if k != "total")
    return "\n".join(
        [
            f"parameters: {params['total']:,} ({parts})",
            f"training FLOPs per token: {prediction['flops_per_token'] / 1e6:.1f} M",
            f"memory ({precision}): parameters {mem.parameters / mib:.1f} MiB, "
            f"gradients {mem.gradients / mib:.1f} MiB, {config.optim.name} state {mem.optimizer / mib:.1f} MiB, "
            f"activations {mem.activations / mib:.1f} MiB",
            f"predicted at {prediction['mfu']:.0%} MFU of {prediction['peak_flops'] / 1e9:,.0f} GFLOP/s: "
            f"{prediction['tokens_per_s']:,.0f} tokens/s, {prediction['tokens'] / 1e6:.1f} M tokens to train on",
        ]
    )


def write_report(out, config, info, prediction, evaluation, samples, corpus, preset, minutes, started) -> Path:
    from scratchlm.tokenizer import Tokenizer
    from scratchlm.tokenizer import stats as tokstats
    from scratchlm.train.metrics import read_metrics

    records = read_metrics(out.run / "metrics.jsonl")
    perf = [r for r in records if "perf/tokens_per_s" in r][1:] or [r for r in records if "perf/tokens_per_s" in r]
    measured_tps = statistics.median(r["perf/tokens_per_s"] for r in perf) if perf else float("nan")
    measured_mfu = measured_tps * prediction["flops_per_token"] / prediction["peak_flops"]  # same peak as predicted
    last = records[-1] if records else {"step": 0, "time_s": 0}
    tokenizer = Tokenizer.load(out.data / "tokenizer")
    val_text = tokenizer.decode(load_tokens(out.data / "val.bin")[0][:200_000].tolist())
    val_text = val_text.replace("<|endoftext|>", "")
    gpt2_dir = tokstats.find_gpt2_dir()
    rows = tokstats.compare(tokenizer, val_text, tokstats.load_gpt2(gpt2_dir) if gpt2_dir else None)
    params = accounting.parameter_counts(config.model)
    precision, memory = training_precision(config), training_memory(config)
    tokens_seen = last["step"] * config.tokens_per_step
    run = out.run
    lines = [
        "# scratchlm speedrun report",
        "",
        f"Corpus `{corpus}`, preset `{preset}`, budget {minutes:g} minutes; this report took "
        f"{(time.perf_counter() - started) / 60:.1f} minutes to make (cached stages are skipped).",
        "",
        "## Result",
        "",
        "| metric | value |",
        "|---|---|",
        f"| validation loss (nats/token) | {evaluation['loss']:.4f} |",
        f"| validation perplexity | {evaluation['perplexity']:.2f} |",
        f"| **validation bits per byte** | **{evaluation['bits_per_byte']:.4f}** |",
        f"| steps | {last['step']:,} |",
        f"| tokens trained on | {tokens_seen:,} |",
        f"| training time | {last['time_s'] / 60:.1f} min |",
        "",
        "![loss curves](run/loss.png)",
        "",
        "## Samples",
        "",
        *[f"Prompt `{s.prompt!r}` (temperature 0.8, top-p 0.95):\n\n```\n{s.prompt}{s.text}\n```\n" for s in samples],
        "## Predicted vs measured",
        "",
        "| | predicted | measured |",
        "|---|---|---|",
        f"| tokens/s | {prediction['tokens_per_s']:,.0f} | {measured_tps:,.0f} |",
        f"| MFU | {prediction['mfu']:.1%} | {measured_mfu:.1%} |",
        f"| tokens trained on | {prediction['tokens']:,.0f} | {tokens_seen:,} |",
        "",
        f"MFU = tokens/s x {prediction['flops_per_token'] / 1e6:.2f} MFLOP/token / "
        f"{prediction['peak_flops'] / 1e9:,.1f} GFLOP/s peak (for a CPU: its measured fp32 matmul peak).",
        "",
        "## Accounting",
        "",
        "| component | parameters |",
        "|---|---|",
        *[f"| {k} | {v:,} |" for k, v in params.items()],
        "",
        f"Training memory ({precision}, batch {config.batch_size} x {config.model.context_length}): parameters "
        f"{memory.parameters / 2**20:.1f} MiB, gradients {memory.gradients / 2**20:.1f} MiB, {config.optim.name} state "
        f"{memory.optimizer / 2**20:.1f} MiB, activations {memory.activations / 2**20:.1f} MiB.",
        "",
        "## Tokenizer",
        "",
        f"{tokenizer.vocab_size:,} tokens trained on {len(info['train']['documents'])} training documents; "
        f"compression on the held-out text ({len(info['val']['documents'])} documents):",
        "",
        "| tokenizer | vocabulary | bytes per token |",
        "|---|---|---|",
        *[f"| {r.name} | {r.vocab_size:,} | {r.bytes_per_token:.3f} |" for r in rows],
        "",
        "## Environment",
        "",
        f"- device: {config.device}, {torch.get_num_threads()} threads; {_cpu_name()}",
        f"- scratchlm {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.platform()}",
        "",
        "## Go on from here",
        "",
        "```bash",
        f"scratchlm train --config {run}/config.toml   # resume this run if it was interrupted",
        f"scratchlm eval --run {run}",
        f'scratchlm generate --run {run} --prompt "{(samples[0].prompt if samples else "").strip()}"',
        f"scratchlm export --run {run} --out {out.root}/hf",
        "```",
        "",
    ]
    atomic_write_text(out.report, "\n".join(lines))
    return out.report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
