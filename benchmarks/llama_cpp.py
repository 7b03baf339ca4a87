"""scratchlm against llama.cpp on the same weights: batch-1 decoding and a served load.

    python benchmarks/llama_cpp.py [--threads 2] [--tokens 128] [--rounds 3] [--requests 32 --rate 4]

The model is SmolLM2-135M-Instruct (`scratchlm import smollm2`: 30 layers, d 576, 49,152-token
vocabulary; 540 MB of float32 weights, well above the L3 cache), exported by `scratchlm export --format
gguf` as F32 and Q8_0. llama.cpp runs those files; scratchlm runs the imported run with float32 and
int8 decoding weights: equal precision, F32 against float32 and Q8_0 against int8 (both 8-bit
weights with a scale per block / per row; llama.cpp's Q8_0 also quantizes the activations to 8 bits
per 32 values, our int8 per row).

llama.cpp is `llama-cpp-python`, built from its source package (`pip install --no-binary`, with the
machine's own CPU flags) in this benchmark's own environment, `$SCRATCHLM_CACHE/llama-cpp-python-*`
(built once, a few minutes on 2 cores). Same machine, same threads.

- Decoding: the same prompt token ids, greedy, `--tokens` new tokens; decode tokens/s after the first
  token (prefill excluded), median of `--rounds` alternating rounds; whether the greedy tokens agree.
- Serving: `python -m llama_cpp.server` (llama-cpp-python's OpenAI-compatible server, one request at
  a time; `--interrupt_requests False`, or each new request cuts the running one short) against
  `scratchlm serve` (continuous batching), the same Poisson load from `scratchlm.serve.load` (streamed
  completions, --requests at --rate, --max-tokens each, every one run to its length).
Targets (issue 15): batch-1 decoding >= 1.0x llama.cpp at equal precision.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import venv
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table

LLAMA_CPP_PYTHON = "0.3.36"
PROMPT = "The history of the printing press begins"

# Runs inside the llama-cpp-python environment: argv = model, threads, new tokens, rounds, prompt ids (JSON).
LLAMA_DECODE = r"""
import json, sys, time
from llama_cpp import Llama
path, (threads, n_new, rounds), prompt = sys.argv[1], map(int, sys.argv[2:5]), json.loads(sys.argv[5])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512, verbose=False)
speeds, tokens = [], []
for _ in range(rounds):
    llm.reset()
    out, first = [], None
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if first is None:
            first = time.perf_counter()
        if len(out) == n_new:
            break
    speeds.append((n_new - 1) / (time.perf_counter() - first))
    tokens = out
print(json.dumps({"tok_s": speeds, "tokens": tokens}))
"""


def llama_python(cache: Path) -> Path:
    """The Python of an environment with llama-cpp-python built from source, made on first use."""
    env = cache / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    python = env / "bin" / "python"
    if (env / ".built").is_file():
        return python
    print(f"building llama-cpp-python {LLAMA_CPP_PYTHON} from source into {env} (a few minutes)...", flush=True)
    venv.create(env, with_pip=True, clear=True)
    build_env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-binary", "llama-cpp-python",
                    f"llama-cpp-python[server]=={LLAMA_CPP_PYTHON}"], check=True, env=build_env)  # fmt: skip
    (env / ".built").write_text("")
    return python


def prepare_models(cache: Path) -> tuple[Path, dict[str, Path]]:
    """The imported SmolLM2 run and its GGUF exports (F32, Q8_0), in the cache."""
    run = cache / "bench-smollm2-run"
    if not (run / "config.toml").is_file():
        subprocess.run([sys.executable, "-m", "scratchlm.cli", "import", "smollm2", "--out", str(run)], check=True)
    files = {kind: cache / f"bench-smollm2-{kind}.gguf" for kind in ("f32", "q8_0")}
    for kind, path in files.items():
        if not path.is_file():
            subprocess.run([sys.executable, "-m", "scratchlm.cli", "export", "--run", str(run), "--format", "gguf",
                            "--dtype", kind, "--out", str(path)], check=True)  # fmt: skip
    return run, files


def ours_decode(model, tokenizer, weights: str, n_new: int) -> tuple[float, list[int]]:
    """(decode tokens/s, the greedy token ids) of scratchlm's `generate` with `weights` decoding weights."""
    from scratchlm.infer.generate import Sampling, generate
    from scratchlm.model.layers import set_decode_weights

    set_decode_weights(model, weights)
    generate(model, tokenizer, [PROMPT], Sampling(temperature=0, max_new_tokens=2))  # builds the decode weights
    out, stats = generate(model, tokenizer, [PROMPT], Sampling(temperature=0, max_new_tokens=n_new))
    return stats.decode_tokens_per_s, out[0].token_ids


def llama_decode(python: Path, gguf: Path, threads: int, n_new: int, rounds: int, prompt: list[int]) -> dict:
    result = subprocess.run([python, "-c", LLAMA_DECODE, str(gguf), str(threads), str(n_new), str(rounds),
                             json.dumps(prompt)], check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f} s")


def serve_load(command: list[str], port: int, args, extra: dict) -> dict:
    from scratchlm.serve.load import run_load

    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, process)
        prompts = [PROMPT, "Once upon a time", "The best way to learn", "In the beginning"]
        run_load(url, prompts[:1], 1.0, 1, 4, 60.0)  # warm-up
        return run_load(url, prompts, args.rate, args.requests, args.max_tokens, args.duration, extra=extra)
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per decoding round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--no-serve", action="store_true", help="decoding only")
    parser.add_argument("--no-decode", action="store_true", help="serving only")
    args = parser.parse_args()
    import torch

    from scratchlm.data.sources import cache_dir
    from scratchlm.infer import load_run

    torch.set_num_threads(args.threads)
    cache = cache_dir()
    python = llama_python(cache)
    run, ggufs = prepare_models(cache)
    model, tokenizer, _, _ = load_run(run, "cpu")
    prompt = tokenizer.encode(PROMPT)
    pairs = [("float32", "f32", "F32"), ("int8", "q8_0", "Q8_0")]
    rows = []
    for weights, kind, label in [] if args.no_decode else pairs:
        ours_speeds, ours_tokens = [], []
        llama = {"tok_s": []}
        for _ in range(args.rounds):  # alternating, so that machine noise hits both alike
            speed, ours_tokens = ours_decode(model, tokenizer, weights, args.tokens)
            ours_speeds.append(speed)
            one = llama_decode(python, ggufs[kind], args.threads, args.tokens, 1, prompt)
            llama["tok_s"] += one["tok_s"]
            llama["tokens"] = one["tokens"]
        ours_tps, llama_tps = statistics.median(ours_speeds), statistics.median(llama["tok_s"])
        same = next((i for i, (a, b) in enumerate(zip(ours_tokens, llama["tokens"], strict=False)) if a != b),
                    min(len(ours_tokens), len(llama["tokens"])))  # fmt: skip
        rows.append([f"{weights} / {label}", f"{ours_tps:,.1f}", f"{llama_tps:,.1f}", f"{ours_tps / llama_tps:.2f}x",
                     f"{same} of {args.tokens}"])  # fmt: skip
        print(rows[-1], flush=True)
    print(f"\nmachine: {machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"llama-cpp-python {LLAMA_CPP_PYTHON} (built from source)")  # fmt: skip
    print(f"SmolLM2-135M-Instruct, batch 1, greedy, {args.tokens} new tokens after {len(prompt)}, "
          f"median of {args.rounds} alternating rounds\n")  # fmt: skip
    if rows:
        print(table(["weights (ours / llama.cpp)", "scratchlm tok/s", "llama.cpp tok/s", "ratio",
                     "greedy tokens identical"], rows))  # fmt: skip
    if args.no_serve:
        return
    # Every request runs to max_tokens on both servers: llama.cpp ends a completion at any end-of-generation
    # token (SmolLM2 writes <|endoftext|> after a few sentences), so those are banned by logit_bias there;
    # scratchlm ends only at the tokenizer's end token (<|im_end|>), which these prompts do not reach.
    ban = {"logit_bias": {str(i): -100 for i in tokenizer.special_ids.values()}}
    served = []
    for weights, kind, label in pairs:
        for name, command in (
            ("llama_cpp.server", lambda port, kind=kind: [str(python), "-m", "llama_cpp.server", "--model",
                                                          str(ggufs[kind]), "--host", "127.0.0.1", "--port", str(port),
                                                          "--n_threads", str(args.threads), "--n_ctx", "2048",
                                                          "--interrupt_requests", "False"]),
            ("scratchlm serve", lambda port, weights=weights: [sys.executable, "-m", "scratchlm.cli", "serve", "--run",
                                                               str(run), "--port", str(port), "--weights", weights]),
        ):  # fmt: skip
            port = free_port()
            s = serve_load(command(port), port, args, ban)
            per_request = s["output_tokens_per_s"] / s["requests_per_s"] if s["requests_per_s"] else 0
            served.append([f"{weights} / {label}", name, f"{s['completed']}/{s['requests']}", f"{per_request:.0f}",
                           f"{s['requests_per_s']:.2f}", f"{s['output_tokens_per_s']:.1f}",
                           f"{s['ttft_ms']['p50']:.0f} / {s['ttft_ms']['p90']:.0f}", f"{s['tpot_ms']['p50']:.1f}",
                           f"{s['e2e_ms']['p90']:.0f}"])  # fmt: skip
            print(served[-1], flush=True)
    print(f"\nserved: {args.requests} streamed completions of {args.max_tokens} tokens, Poisson at {args.rate}/s\n")
    print(table(["weights", "server", "completed", "tokens / request", "requests/s", "output tok/s",
                 "TTFT p50 / p90 ms", "TPOT p50 ms", "E2E p90 ms"], served))  # fmt: skip


if __name__ == "__main__":
    main()
