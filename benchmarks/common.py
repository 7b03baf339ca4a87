"""Shared helpers for the benchmarks: corpora, isolated timed runs with peak memory, tables."""

from __future__ import annotations

import gzip
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def machine() -> str:
    import torch  # noqa: F401 - imported for its version only when present

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def corpora_dir(tmp: Path) -> list[Path]:
    """The ../shared/data corpora, decompressed once into `tmp`."""
    if not (SHARED / "corpora").is_dir():
        sys.exit(f"these benchmarks need the reference corpora in {SHARED / 'corpora'}")
    out = []
    for gz in sorted((SHARED / "corpora").glob("*.txt.gz")):
        target = tmp / gz.name.removesuffix(".gz")
        if not target.exists():
            with gzip.open(gz, "rb") as f:
                target.write_bytes(f.read())
        out.append(target)
    return out


def concatenate(paths: list[Path], dest: Path, limit: int | None = None) -> Path:
    """One file of the given files' text (cut at a line end near `limit` bytes)."""
    data = b"".join(p.read_bytes() for p in paths)
    if limit is not None and limit < len(data):
        data = data[: data.index(b"\n", limit) + 1]
    dest.write_bytes(data)
    return dest


def isolated(code: str) -> dict:
    """Run `code` in a fresh Python; it must print one JSON object last. Adds peak RSS in MB:
    the process's own (`peak_self_mb`) and its largest child's (`peak_child_mb`)."""
    wrapper = (
        code
        + "\nimport resource, json as _j\n"
        + "_r = dict(RESULT, peak_self_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,"
        + " peak_child_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
        + "print(_j.dumps(_r))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"benchmark run failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join([line, rule, *body])
