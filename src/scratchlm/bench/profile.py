"""A profile of a few runs of one mode: a Chrome-trace JSON (open it in https://ui.perfetto.dev) and the
operators that take the most self time, with the share of the time spent in matmuls.

On CPU the rows are ATen operators (self CPU time); on CUDA, GPU kernels and the operators that launch
them (self device time). Matmuls: ATen's mm / addmm / bmm / baddbmm / _scaled_mm (in place or not)
and oneDNN's linear on CPU, GEMM kernels (cuBLAS, CUTLASS) on CUDA.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from scratchlm.bench.timing import Workload

MATMUL = re.compile(
    r"^aten::(mm|addmm|bmm|baddbmm|_scaled_mm|_int_mm|_weight_int8pack_mm)_?$|mkldnn.*linear|gemm|cutlass|xmma|cublas",
    re.IGNORECASE,
)


def is_matmul(name: str) -> bool:
    return bool(MATMUL.search(name))


def profile_mode(workload: Workload, mode: str, steps: int, trace: Path | None, top: int = 15) -> dict:
    """Profile `steps` runs of `mode` (after one warm-up run). Writes the Chrome trace to `trace` (whole
    or not at all). Returns {"rows": [{name, calls, self_ms (per run), share}], "matmul_share", "total_ms"}."""
    cuda = workload.device.type == "cuda"
    workload.run(mode)
    workload.synchronize()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            workload.run(mode)
        workload.synchronize()
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        temporary = trace.with_name(f".{trace.name}.tmp")
        prof.export_chrome_trace(str(temporary))
        os.replace(temporary, trace)
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(self_time(e) for e in events) or 1
    ranked = sorted(events, key=self_time, reverse=True)
    rows = [
        {"name": e.key, "calls": e.count // steps, "self_ms": self_time(e) / 1e3 / steps, "share": self_time(e) / total}
        for e in ranked[:top]
        if self_time(e) > 0
    ]
    matmul = sum(self_time(e) for e in events if is_matmul(e.key))
    return {"rows": rows, "matmul_share": matmul / total, "total_ms": total / 1e3 / steps, "trace": str(trace)}
