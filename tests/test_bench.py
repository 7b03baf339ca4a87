"""`scratchlm bench`: the timings, the profile (a Chrome trace that Perfetto can open, operators by self
time, the matmul share) and the memory by kind, run end to end at a tiny shape; the named sizes."""

import json
import subprocess
import sys

import pytest

from scratchlm import accounting
from scratchlm.bench.profile import is_matmul
from scratchlm.bench.run import resolve
from scratchlm.bench.sizes import SIZES


def bench(*args: str) -> list[dict]:
    tiny = ["--set", "model.n_layers=2", "--batch", "2", "--context", "32", "--warmup", "1", "--steps", "2"]
    done = subprocess.run([sys.executable, "-m", "scratchlm.cli", "bench", "--size", "cpu-tiny", *tiny, *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_bench_times_every_mode_and_profiles_and_measures_memory(tmp_path):
    [result] = json.loads(bench("--json", "--profile", "--memory", "--out", str(tmp_path)))
    assert (result["name"], result["batch"], result["context"]) == ("cpu-tiny", 2, 32)
    assert [t["mode"] for t in result["timings"]] == ["forward", "forward-backward", "step"]
    config = resolve(None, "cpu-tiny", ["model.n_layers=2"], 2, 32).model
    forward = accounting.forward_flops(config, 2, 32)["total"]
    for t in result["timings"]:
        assert len(t["seconds"]) == 2 and all(s > 0 for s in t["seconds"])
        assert t["flops"] == (forward if t["mode"] == "forward" else 3 * forward)
        assert t["tokens_per_s"] == pytest.approx(64 / t["mean_s"])
        assert 0 < t["mfu"] < 1.5
    profile = result["profile"]
    trace = json.loads((tmp_path / "cpu-tiny-trace.json").read_text())
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    assert profile["rows"] and 0 < profile["matmul_share"] < 1
    assert sum(r["share"] for r in profile["rows"]) <= 1 + 1e-9
    memory = result["memory"]
    measured, predicted = sum(memory["saved_measured"].values()), sum(memory["saved_predicted"].values())
    assert abs(measured - predicted) < 0.15 * predicted
    assert set(memory["saved_measured"]) >= {"attention", "feed-forward", "norms", "lm head + loss"}


def test_bench_table_lists_each_mode_and_the_checkpointed_memory():
    out = bench("--mode", "step", "--memory", "--set", "model.activation_checkpointing=blocks")
    lines = out.splitlines()
    assert lines[0].split() == ["size", "params", "batch", "x", "ctx", "dtype", "mode", "mean", "ms", "std", "ms",
                                "tokens/s", "MFU"]  # fmt: skip
    assert lines[1].split()[0] == "cpu-tiny" and "step" in lines[1]
    blocks = next(line for line in lines if line.strip().startswith("checkpointed block inputs"))
    # measured and predicted: 2 blocks x 2 x 32 tokens x 128 wide x 4 bytes = 64 KiB
    assert blocks.split()[-4:] == ["0.06", "MiB", "0.06", "MiB"] and "recomputed in backward" in out


def test_named_sizes_are_the_courses():
    assert {k: (s.d_model, s.d_ff, s.n_layers, s.n_heads) for k, s in SIZES.items() if not k.startswith("cpu")} == {
        "small": (768, 3072, 12, 12), "medium": (1024, 4096, 24, 16), "large": (1280, 5120, 36, 20),
        "xl": (1600, 6400, 48, 25), "2.7B": (2560, 10240, 32, 32)}  # fmt: skip
    assert all(s.vocab_size == 10_000 for s in SIZES.values())
    config = resolve(None, "medium", ["model.activation_checkpointing=blocks"], None, 256)
    assert (config.model.d_model, config.model.context_length, config.batch_size) == (1024, 256, 4)


def test_matmuls_are_told_from_other_operators():
    for name in (
        "aten::mm",
        "aten::addmm",
        "aten::addmm_",
        "aten::bmm",
        "sm90_xmma_gemm_bf16bf16",
        "ampere_sgemm_128x64_tn",
    ):
        assert is_matmul(name), name
    for name in ("aten::add", "aten::mul", "_RMSNorm", "aten::mm_backward_helper"):
        assert not is_matmul(name), name
