"""The `scratchlm` command. Sub-commands follow the pipeline:

speedrun (all of it) = tokenizer train|encode|stats -> data prepare -> train -> eval -> generate -> export;
account (costs before you spend them)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from scratchlm.errors import ScratchLMError

DEFAULT_SPECIAL = "<|endoftext|>"


def _corpus_files(specs: list[str]) -> list[Path]:
    from scratchlm.data.sources import resolve_corpus

    return [path for spec in specs for path in resolve_corpus(spec)]


def _read_text(paths: list[Path], limit_bytes: int | None = None) -> str:
    from scratchlm.tokenizer.pretokenize import decode_utf8

    data = b"".join(p.read_bytes() for p in paths)
    if limit_bytes:
        data = data[:limit_bytes]
        data = data[: len(data.decode("utf-8", "ignore").encode())]  # do not cut a character in two
    return decode_utf8(data, paths[0] if len(paths) == 1 else Path("+".join(p.name for p in paths[:3])), 0)


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
    from scratchlm.tokenizer import Tokenizer, train_bpe

    paths = _corpus_files(args.corpus)
    size = sum(p.stat().st_size for p in paths)
    print(f"training byte-level BPE: {len(paths)} file(s), {size / 1e6:.1f} MB, vocab_size {args.vocab_size:,}")
    start = time.perf_counter()
    vocab, merges = train_bpe(paths, args.vocab_size, args.special_token, workers=args.workers, progress=True)
    elapsed = time.perf_counter() - start
    tokenizer = Tokenizer(vocab, merges, args.special_token)
    tokenizer.save(args.out)
    print(f"trained in {elapsed:.1f} s ({size / 1e6 / elapsed:.1f} MB/s); saved to {args.out}/ "
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
          f"({meta['bytes'] / 1e6 / elapsed:.1f} MB/s) -> {args.out}")  # fmt: skip


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
    from scratchlm.train.trainer import train

    config = load_config(args.config, args.set or [])
    result = train(config, fresh=args.fresh)
    if result.get("interrupted"):
        raise SystemExit(130)


def cmd_eval(args: argparse.Namespace) -> None:
    from scratchlm.train.evaluate import evaluate_run

    result = evaluate_run(args.run, args.set or [])
    print(
        f"{args.run}: step {result['step']}: validation loss {result['loss']:.4f}  "
        f"perplexity {result['perplexity']:.2f}  bits/byte {result['bits_per_byte']:.4f}  ({result['tokens']:,} tokens)"
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from scratchlm.infer import Sampling, generate, load_run

    model, tokenizer, _, step = load_run(args.run, args.device)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.seed, args.stop or ())
    prompts = args.prompt
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
        f"[step {step} | prefill {stats.prefill_tokens} tokens at {stats.prefill_tokens_per_s:,.0f} tok/s | "
        f"decode {stats.decode_tokens} tokens at {stats.decode_tokens_per_s:,.1f} tok/s | "
        f"stopped: {', '.join(sorted({r.stop_reason for r in results}))}]",
        file=sys.stderr,
    )


def cmd_account(args: argparse.Namespace) -> None:
    import json

    from scratchlm.account_report import account, format_account
    from scratchlm.accounting import PRESETS
    from scratchlm.train.config import load_config

    model = load_config(args.config, args.set or []).model if args.config else PRESETS[args.preset]
    if args.remeasure_peak:
        from scratchlm.accounting import cpu_peak_flops

        print(
            f"local CPU fp32 matmul peak, re-measured: {cpu_peak_flops(remeasure=True) / 1e9:.1f} GFLOP/s",
            file=sys.stderr,
        )
    seq = args.seq or model.context_length
    report = account(model, args.batch, seq, args.device, args.mfu, args.tokens, args.memory_gb)
    print(json.dumps(report, indent=1) if args.json else format_account(report))


def cmd_export(args: argparse.Namespace) -> None:
    from scratchlm.infer import load_run
    from scratchlm.infer.export import export_huggingface

    model, _, config, step = load_run(args.run, "cpu")
    out = export_huggingface(model, args.out, config.data.tokenizer)
    print(f"exported {args.run} (step {step}) to {out}/: model.safetensors, config.json, tokenizer.json")
    print(f"load it with: transformers.LlamaForCausalLM.from_pretrained({str(out)!r})")


def cmd_speedrun(args: argparse.Namespace) -> None:
    from scratchlm.speedrun import run_speedrun

    run_speedrun(args.corpus, args.minutes, args.out, args.preset, args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scratchlm", description=__doc__)
    stages = parser.add_subparsers(dest="stage", required=True)

    run = stages.add_parser("speedrun", help="the whole pipeline: text -> tokenizer -> model -> samples -> report.md")
    run.add_argument("--corpus", default="shakespeare", help="'shakespeare' (default), a text file or a folder")
    run.add_argument("--minutes", type=float, default=10.0, help="training budget (default 10)")
    run.add_argument("--out", default="runs/speedrun", help="output directory (default runs/speedrun)")
    run.add_argument("--preset", choices=["cpu", "gpu", "tiny"], default=None, help="default: gpu on CUDA, else cpu")
    run.add_argument("--device", default="auto")
    run.set_defaults(func=cmd_speedrun)

    tok = stages.add_parser("tokenizer", help="train, apply and inspect byte-level BPE tokenizers")
    tok_cmds = tok.add_subparsers(dest="command", required=True)

    def stats_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gpt2-dir", help="folder with gpt2_vocab.json + gpt2_merges.txt for the GPT-2 row")
        p.add_argument("--stats-bytes", type=int, default=2_000_000, help="measure on the first N bytes")
        p.add_argument("--top", type=int, default=10, help="how many of the longest tokens to list")

    train = tok_cmds.add_parser("train", help="train a tokenizer on text files and print its statistics")
    train.add_argument("--corpus", nargs="+", default=["shakespeare"],
                       help="'shakespeare' (default), text files, or folders of .txt files")  # fmt: skip
    train.add_argument("--vocab-size", type=int, default=10_000)
    train.add_argument("--special-token", action="append", default=None,
                       help=f"a special token (repeatable; default {DEFAULT_SPECIAL})")  # fmt: skip
    train.add_argument("--out", default="runs/tokenizer", help="output directory (default runs/tokenizer)")
    train.add_argument("--workers", type=int, default=None, help="processes for pre-tokenization (default: all cores)")
    stats_options(train)
    train.set_defaults(func=cmd_tokenizer_train)

    enc = tok_cmds.add_parser("encode", help="encode text files into a token array (.bin + .json sidecar)")
    enc.add_argument("inputs", nargs="+", help="text files, folders of .txt files, or 'shakespeare'")
    enc.add_argument("--tokenizer", required=True, help="tokenizer directory written by `tokenizer train`")
    enc.add_argument("--out", required=True, help="output token file, e.g. data/train.bin")
    enc.add_argument("--workers", type=int, default=None)
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
    prep.add_argument("--vocab-size", type=int, default=10_000)
    prep.add_argument("--val-fraction", type=float, default=0.05)
    prep.add_argument("--out", default="data/shakespeare")
    prep.add_argument("--workers", type=int, default=None)
    prep.set_defaults(func=cmd_data_prepare)

    tr = stages.add_parser("train", help="train a Transformer LM (resumes the run if it has a checkpoint)")
    tr.add_argument("--config", help="TOML config (e.g. configs/shakespeare-cpu.toml); default: built-in defaults")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set model.d_model=256")
    tr.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
    tr.set_defaults(func=cmd_train)

    ev = stages.add_parser("eval", help="validation loss, perplexity and bits per byte of a run")
    ev.add_argument("--run", required=True, help="run directory")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set eval_tokens=1000000")
    ev.set_defaults(func=cmd_eval)

    gen = stages.add_parser("generate", help="sample text from a trained run (streams; KV cache)")
    gen.add_argument("--run", required=True, help="run directory")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=0.95, help="1.0 = off")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop when this string appears (repeatable)")
    gen.add_argument("--device", default=None, help="override the run's device (e.g. cpu)")
    gen.set_defaults(func=cmd_generate)

    exp = stages.add_parser("export", help="export a run to the Hugging Face format (LlamaForCausalLM)")
    exp.add_argument("--run", required=True, help="run directory")
    exp.add_argument("--out", required=True, help="output directory")
    exp.set_defaults(func=cmd_export)

    from scratchlm.account_report import DEVICES
    from scratchlm.accounting import PRESETS

    acc = stages.add_parser("account", help="parameters, FLOPs, memory and time of a configuration")
    source = acc.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="gpt2-small")
    source.add_argument("--config", help="a TOML training config (its [model] section)")
    acc.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. model.n_layers=8")
    acc.add_argument("--batch", type=int, default=8)
    acc.add_argument("--seq", type=int, default=0, help="sequence length (default: the context length)")
    acc.add_argument("--device", choices=DEVICES, default="h100")
    acc.add_argument("--mfu", type=float, default=0.4)
    acc.add_argument("--tokens", type=float, default=1e9, help="tokens to train on, for the time estimate")
    acc.add_argument("--memory-gb", type=float, default=80.0, help="device memory for the largest batch")
    acc.add_argument("--json", action="store_true", help="machine-readable output")
    acc.add_argument(
        "--remeasure-peak", action="store_true", help="measure the local CPU's matmul peak again and cache it"
    )
    acc.set_defaults(func=cmd_account)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "special_token", "unset") is None:
        args.special_token = [DEFAULT_SPECIAL]
    try:
        args.func(args)
    except ScratchLMError as exc:
        print(f"scratchlm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("scratchlm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
