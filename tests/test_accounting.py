"""Accounting against measurements: numel(), FlopCounterMode, saved-tensor hooks, hand-computed numbers."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from scratchlm import accounting
from scratchlm.bench.memory import saved_for_backward
from scratchlm.model import ModelConfig, TransformerLM, kernels

EXTRAS = {"n_kv_heads": 2, "value_embeddings": True, "unet_skips": True}
CONFIGS = [
    ModelConfig(vocab_size=500, context_length=64, d_model=64, n_layers=2, n_heads=4),
    ModelConfig(vocab_size=300, context_length=32, d_model=96, n_layers=3, n_heads=6, n_kv_heads=2, ffn="silu"),
    ModelConfig(vocab_size=256, context_length=48, d_model=32, n_layers=1, n_heads=2, tie_embeddings=True),
    ModelConfig(vocab_size=200, context_length=32, d_model=32, n_layers=3, n_heads=4, ffn="relu2", **EXTRAS),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_parameter_count_equals_numel(config):
    counts = accounting.parameter_counts(config)
    assert counts["total"] == TransformerLM(config).num_parameters()


def test_parameters_by_hand():
    config = ModelConfig(vocab_size=100, context_length=8, d_model=16, n_layers=2, n_heads=2, d_ff=48)
    counts = accounting.parameter_counts(config)
    assert counts == {"embeddings": 1600, "attention": 2 * 4 * 256, "feed-forward": 2 * 3 * 16 * 48,
                      "norms": 5 * 16, "lm head": 1600, "total": 1600 + 2048 + 4608 + 80 + 1600}  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(("batch", "seq"), [(2, 16), (1, 32)])
def test_forward_flops_equal_flop_counter(config, fused, batch, seq):
    config = ModelConfig(**{**vars(config), "fused_kernels": fused})
    model = TransformerLM(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    predicted = accounting.forward_flops(config, batch, seq)
    counted = counter.get_total_flops()
    if fused:  # FlopCounterMode has no formula for PyTorch's CPU flash-attention kernel: it counts 0 there
        counted += predicted["attention scores + weighted sum"]
    assert counted == predicted["total"]


def test_training_flops_and_six_n_t():
    config = ModelConfig(vocab_size=1000, context_length=128, d_model=64, n_layers=2, n_heads=4)
    t = accounting.training_flops(config, 4, 128)
    assert t["step"] == 3 * t["forward"] and t["backward"] == 2 * t["forward"]
    assert t["6NT"] == 6 * accounting.matmul_parameters(config) * 512
    long = accounting.training_flops(ModelConfig(**{**vars(config), "context_length": 8192}), 1, 8192)
    assert long["6NT / exact"] < 0.3 < t["6NT / exact"]  # the rule of thumb breaks at long contexts
    per_token = accounting.training_flops_per_token(config)
    assert per_token == 6 * accounting.matmul_parameters(config) + 12 * 2 * 64 * 128


def measured_saved_bytes(model, ids, targets) -> int:
    """Bytes of distinct storages saved for backward in one training step, parameters excluded."""
    return sum(saved_for_backward(model, ids, targets).values())


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(vocab_size=1000, context_length=128, d_model=128, n_layers=4, n_heads=4),
        ModelConfig(vocab_size=10000, context_length=256, d_model=256, n_layers=2, n_heads=8, n_kv_heads=2),
        ModelConfig(vocab_size=500, context_length=64, d_model=64, n_layers=3, n_heads=4, ffn="silu"),
        ModelConfig(vocab_size=500, context_length=64, d_model=64, n_layers=2, n_heads=8),  # PyTorch's attention
    ],
)
def test_activation_memory_prediction_within_15_percent(config):
    torch.manual_seed(0)
    model = TransformerLM(config)
    batch, seq = 4, config.context_length
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    measured = measured_saved_bytes(model, ids, torch.randint(0, config.vocab_size, (batch, seq)))
    predicted = accounting.memory_estimate(config, batch, seq).activations
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)


def test_dropout_adds_a_byte_per_masked_element():
    plain = ModelConfig(vocab_size=1000, context_length=128, d_model=128, n_layers=4, n_heads=4)
    dropped = ModelConfig(**{**vars(plain), "dropout": 0.1})
    estimate = accounting.memory_estimate
    # On CUDA, where attention is PyTorch's either way (on CPU dropout also leaves the C attention kernel).
    extra = estimate(dropped, 4, 128, device="cuda").activations - estimate(plain, 4, 128, device="cuda").activations
    assert extra == (2 * 4 + 1) * 4 * 128 * 128  # embeddings + 2 branches x 4 layers, 4 x 128 tokens x 128 wide
    assert not accounting.uses_c_attention(dropped, 128)
    assert accounting.uses_c_attention(plain, 128) == kernels.HAVE_C_ATTENTION


def test_memory_by_kind_and_largest_batch():
    config = accounting.PRESETS["gpt2-small"]
    n = accounting.parameter_counts(config)["total"]
    fp32 = accounting.memory_estimate(config, 8, 1024, "fp32", "cuda")
    bf16 = accounting.memory_estimate(config, 8, 1024, "bf16-mixed", "cuda")
    assert (fp32.parameters, fp32.gradients, fp32.optimizer) == (4 * n, 4 * n, 8 * n)
    assert bf16.activations * 2 == fp32.activations and bf16.parameters == fp32.parameters
    biggest = accounting.largest_batch(config, 1024, 80 * 2**30, "fp32", "cuda")
    assert accounting.memory_estimate(config, biggest, 1024, "fp32", "cuda").total <= 80 * 2**30
    assert accounting.memory_estimate(config, biggest + 1, 1024, "fp32", "cuda").total > 80 * 2**30
    if kernels.HAVE_C_ATTENTION:  # on CPU the C attention keeps neither q nor k after RoPE: d + kv fewer floats a token
        cpu = accounting.memory_estimate(config, 8, 1024, "fp32", "cpu")
        assert fp32.activations - cpu.activations == 4 * config.n_layers * (8 * 1024 * 2 * 768 + 2 * 1024 * 64)


def test_training_time_by_hand():
    config = accounting.PRESETS["gpt2-small"]
    per_token = accounting.training_flops_per_token(config)
    assert accounting.training_time_s(config, 1e9, 989e12, 0.5) == pytest.approx(1e9 * per_token / (989e12 * 0.5))
    assert accounting.device_peak_flops("h100", "bf16") == 989e12


def test_account_cli_json_and_table():
    def run(*args):
        command = [sys.executable, "-m", "scratchlm.cli", "account", *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout

    out = run("--preset", "gpt2-small", "--json")
    report = json.loads(out)
    assert report["parameters"]["total"] == accounting.parameter_counts(accounting.PRESETS["gpt2-small"])["total"]
    table = run("--preset", "gpt2-xl", "--device", "a100")
    assert "6 N T rule of thumb" in table and "largest batch" in table


def test_cpu_peak_is_cached_and_never_lowered(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path))
    monkeypatch.setattr(accounting, "cpu_peak_floor", lambda threads: None)
    measurements = iter([100e9, 150e9, 120e9])
    monkeypatch.setattr(accounting, "robust_cpu_peak", lambda: next(measurements))
    assert accounting.cpu_peak_flops() == 100e9
    assert accounting.cpu_peak_flops() == 100e9  # cached: not measured again
    assert accounting.cpu_peak_flops(remeasure=True) == 150e9
    assert accounting.cpu_peak_flops(remeasure=True) == 150e9  # 120 read at a busy moment: the best stays
    assert list(json.loads((tmp_path / "cpu_peak.json").read_text()).values()) == [150e9]
    assert accounting.record_cpu_peak(180e9) == 180e9  # a run's own throughput beats it: that is the peak
    assert accounting.cpu_peak_flops() == 180e9


def test_cpu_peak_below_the_hardware_floor_is_measured_again(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path))
    monkeypatch.setattr(accounting, "cpu_peak_floor", lambda threads: 160e9)
    measurements = iter([80e9, 190e9, 999e9])
    monkeypatch.setattr(accounting, "robust_cpu_peak", lambda: next(measurements))
    assert accounting.cpu_peak_flops() == 190e9  # the busy 80 was rejected, the retry kept
    assert "below the 160.0 GFLOP/s" in capsys.readouterr().err


def test_cpu_peak_floor_from_cpuinfo(monkeypatch, tmp_path):
    """Cores x clock x lanes x 2 (one FMA unit), from /proc/cpuinfo: 2 x 2.5 GHz x 8 lanes x 2 = 80 GFLOP/s."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu MHz\t\t: 2500.000\nflags\t\t: fpu sse2 avx avx2 fma\n")
    real_path = accounting.Path
    monkeypatch.setattr(accounting, "Path", lambda p: info if p == "/proc/cpuinfo" else real_path(p))
    monkeypatch.setattr(accounting.os, "cpu_count", lambda: 2)
    assert accounting.cpu_peak_floor(2) == pytest.approx(80e9)
    assert accounting.cpu_peak_floor(8) == pytest.approx(80e9)  # never more cores than there are
    info.write_text("cpu MHz\t\t: 2500.000\nflags\t\t: avx2 fma avx512f\n")
    assert accounting.cpu_peak_floor(1) == pytest.approx(80e9)  # 16 lanes
    info.write_text("cpu MHz\t\t: 2500.000\nflags\t\t: sse2\n")
    assert accounting.cpu_peak_floor(1) is None


@pytest.mark.skipif(not accounting.Path("/proc/cpuinfo").is_file(), reason="needs Linux's /proc/cpuinfo")
def test_this_cpus_measured_peak_is_above_its_floor():
    floor = accounting.cpu_peak_floor(torch.get_num_threads())
    if floor is None:
        pytest.skip("no AVX2/AVX-512 here: no floor is derived")
    if os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1):
        pytest.skip(f"the machine is busy (load {os.getloadavg()[0]:.1f}): a measured peak says nothing now")
    assert accounting.robust_cpu_peak() >= 0.8 * floor  # the floor is a real lower bound (idle or not quite)


CHECKPOINTED = ModelConfig(vocab_size=1000, context_length=128, d_model=128, n_layers=4, n_heads=4)


@pytest.mark.parametrize("mode", ["none", "blocks", "every:2", "every:3"])
def test_saved_bytes_by_kind_match_the_prediction_with_and_without_checkpointing(mode):
    config = ModelConfig(**{**vars(CHECKPOINTED), "activation_checkpointing": mode})
    torch.manual_seed(0)
    model = TransformerLM(config)
    batch, seq = 4, config.context_length
    ids, targets = (torch.randint(0, config.vocab_size, (batch, seq)) for _ in range(2))
    measured = saved_for_backward(model, ids, targets)
    predicted = {k: 4 * v for k, v in accounting.activation_elements(config, batch, seq).items()}
    for kind in ("norms", "attention", "feed-forward", "checkpointed block inputs", "lm head + loss"):
        assert abs(measured[kind] - predicted[kind]) <= 0.15 * max(predicted[kind], 1), (kind, measured, predicted)
    # Each checkpointed block keeps exactly its input, (batch, seq, d_model) float32.
    assert measured["checkpointed block inputs"] == config.checkpointed_layers * batch * seq * config.d_model * 4
    assert measured["embeddings"] == batch * seq * 8  # the token ids (int64) the lookup keeps


def test_checkpointing_cuts_saved_memory_by_the_predicted_factor():
    torch.manual_seed(0)
    batch, seq = 4, CHECKPOINTED.context_length
    ids, targets = (torch.randint(0, CHECKPOINTED.vocab_size, (batch, seq)) for _ in range(2))
    measured, predicted = {}, {}
    for mode in ("none", "blocks"):
        config = ModelConfig(**{**vars(CHECKPOINTED), "activation_checkpointing": mode})
        measured[mode] = measured_saved_bytes(TransformerLM(config), ids, targets)
        predicted[mode] = accounting.memory_estimate(config, batch, seq).activations
    factor_measured = measured["none"] / measured["blocks"]
    factor_predicted = predicted["none"] / predicted["blocks"]
    assert factor_measured > 3
    assert abs(factor_measured - factor_predicted) / factor_predicted < 0.1, (factor_measured, factor_predicted)


def test_checkpointing_adds_one_blocks_recompute_and_lets_a_larger_batch_fit():
    config = accounting.PRESETS["gpt2-small"]
    blocks = ModelConfig(**{**vars(config), "activation_checkpointing": "blocks"})
    plain, checkpointed = (accounting.memory_estimate(c, 8, 1024, "fp32", "cuda") for c in (config, blocks))
    assert plain.recompute == 0
    one_block = (plain.activations - accounting.memory_estimate(
        ModelConfig(**{**vars(config), "n_layers": 11}), 8, 1024, "fp32", "cuda").activations)  # fmt: skip
    assert checkpointed.recompute == one_block
    assert checkpointed.activations == plain.activations - 12 * (one_block - 4 * 8 * 1024 * 768)
    assert accounting.largest_batch(blocks, 1024, 80 * 2**30, "fp32", "cuda") > 5 * accounting.largest_batch(
        config, 1024, 80 * 2**30, "fp32", "cuda")  # fmt: skip


@pytest.mark.parametrize("name", ["adamw", "muon", "rmsprop", "adagrad", "sgd"])
def test_optimizer_state_equals_what_the_optimizer_keeps(name, tmp_path):
    from scratchlm.train.config import load_config
    from scratchlm.train.setup import build_optimizer

    sets = [
        "model.vocab_size=300",
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.context_length=16",
    ]
    config = load_config(None, [*sets, "model.tie_embeddings=false", f'optim.name="{name}"'])
    model = TransformerLM(config.model)
    optimizer = build_optimizer(config, model)
    x = torch.randint(0, 300, (2, 17))
    model.loss(x[:, :-1], x[:, 1:]).backward()
    optimizer.step()  # the state exists after the first step
    kept = sum(t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    assert accounting.optimizer_state_elements(config.model, name) == kept
    estimate = accounting.memory_estimate(config.model, 1, 16, optimizer=name)
    assert estimate.optimizer == 4 * kept
