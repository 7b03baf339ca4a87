"""A load generator for an OpenAI-compatible server (`scratchlm bench serve`): Poisson arrivals at a
given rate, streamed completions, bounded in requests and time; per-request time to first token
(TTFT), time per output token (TPOT, after the first), inter-token latency (ITL) and end-to-end
latency, with mean, p50, p90 and p99, and throughput in requests/s and output tokens/s.

Each request runs on its own thread with `http.client` (it decodes chunked streams); a token is a
streamed piece of text (the server sends one per generated token, except what it holds back for a
stop string).
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np


@dataclass
class Timing:
    sent: float
    first: float | None = None
    chunks: list[float] = field(default_factory=list)
    done: float | None = None
    error: str | None = None


def one_request(url: str, body: dict, timing: Timing, timeout: float) -> None:
    parts = urlparse(url)
    try:
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})  # fmt: skip
        response = conn.getresponse()
        if response.status != 200:
            timing.error = f"HTTP {response.status}: {response.read()[:200]!r}"
            return
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            if json.loads(line[6:])["choices"][0]["text"]:
                now = time.perf_counter()
                timing.first = timing.first or now
                timing.chunks.append(now)
        timing.done = time.perf_counter()
        conn.close()
    except (OSError, http.client.HTTPException, ValueError) as exc:
        timing.error = f"{type(exc).__name__}: {exc}"


def run_load(url: str, prompts: list[str], rate: float, requests: int, max_tokens: int, duration: float,
             seed: int = 0, timeout: float = 120.0, extra: dict | None = None) -> dict:  # fmt: skip
    """Send `requests` requests (at most for `duration` seconds) with exponential gaps of mean 1/rate.
    extra: more fields for every request's body (e.g. a server's own options)."""
    rng = random.Random(seed)
    timings, threads = [], []
    start = time.perf_counter()
    for i in range(requests):
        if time.perf_counter() - start > duration:
            break
        body = {"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": 0, **(extra or {})}
        timing = Timing(time.perf_counter())
        thread = threading.Thread(target=one_request, args=(url, body, timing, timeout), daemon=True)
        thread.start()
        timings.append(timing)
        threads.append(thread)
        time.sleep(rng.expovariate(rate))
    for thread in threads:
        thread.join(timeout=max(0.0, timeout - (time.perf_counter() - start)))
    wall = time.perf_counter() - start
    return summarize(timings, wall)


def _stats(values) -> dict:
    a = np.asarray(values, dtype=float) * 1e3
    if not len(a):
        return {k: float("nan") for k in ("mean", "p50", "p90", "p99")}
    return {"mean": a.mean(), "p50": np.percentile(a, 50), "p90": np.percentile(a, 90), "p99": np.percentile(a, 99)}


def summarize(timings: list[Timing], wall: float) -> dict:
    ok = [t for t in timings if t.error is None and t.done is not None and t.chunks]
    tokens = sum(len(t.chunks) for t in ok)
    return {
        "requests": len(timings),
        "completed": len(ok),
        "errors": [t.error for t in timings if t.error][:5],
        "seconds": wall,
        "requests_per_s": len(ok) / wall,
        "output_tokens_per_s": tokens / wall,
        "ttft_ms": _stats([t.first - t.sent for t in ok]),
        "tpot_ms": _stats([(t.done - t.first) / (len(t.chunks) - 1) for t in ok if len(t.chunks) > 1]),
        "itl_ms": _stats([b - a for t in ok for a, b in zip(t.chunks, t.chunks[1:], strict=False)]),
        "e2e_ms": _stats([t.done - t.sent for t in ok]),
    }


def format_summary(s: dict) -> str:
    lines = [
        f"{s['completed']}/{s['requests']} requests in {s['seconds']:.1f} s: {s['requests_per_s']:.2f} requests/s, "
        f"{s['output_tokens_per_s']:.1f} output tokens/s",
        f"{'ms':<6} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}",
    ]
    for key in ("ttft", "tpot", "itl", "e2e"):
        st = s[f"{key}_ms"]
        lines.append(f"{key.upper():<6} {st['mean']:>9.1f} {st['p50']:>9.1f} {st['p90']:>9.1f} {st['p99']:>9.1f}")
    lines += [f"error: {e}" for e in s["errors"]]
    return "\n".join(lines)
