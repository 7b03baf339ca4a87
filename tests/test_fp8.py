"""FP8 training matmuls (`scratchlm.kernels.fp8`) against float32 `F.linear`, on PyTorch's CPU
implementation of `torch._scaled_mm` (the same call runs on H100-class tensor cores)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from scratchlm.kernels.fp8 import E4M3, E5M2, convert_to_fp8, fp8_linear, quantize, scaled_matmul
from scratchlm.model import ModelConfig, TransformerLM
from scratchlm.train.metrics import read_metrics
from scratchlm.train.trainer import train


def relative_error(actual, wanted) -> float:
    return ((actual.double() - wanted.double()).norm() / wanted.double().norm()).item()


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_quantize_scales_the_largest_value_to_the_format_s_largest(dtype):
    t = torch.tensor([[0.5, -3.0, 1.25], [2.0, 0.1, -0.2]])
    t8, scale = quantize(t, dtype, None)
    top = torch.finfo(dtype).max  # 448 for e4m3, 57344 for e5m2
    assert t8.dtype == dtype and scale.item() == pytest.approx(3.0 / top)
    assert t8.float().abs().max().item() == top
    mantissa_bits = 3 if dtype == E4M3 else 2
    assert torch.allclose(t8.float() * scale, t, rtol=2.0**-mantissa_bits, atol=0)  # round to nearest: half a step
    _, row_scales = quantize(t, dtype, 1)
    assert row_scales.shape == (2, 1) and row_scales[:, 0].tolist() == pytest.approx([3.0 / top, 2.0 / top])


@pytest.mark.parametrize("rowwise", [False, True], ids=["tensorwise", "rowwise"])
def test_fp8_linear_is_f_linear_within_fp8_rounding(rowwise):
    torch.manual_seed(0)
    x, weight = torch.randn(4, 8, 64, requires_grad=True), torch.randn(48, 64, requires_grad=True)
    grad = torch.randn(4, 8, 48)
    y = fp8_linear(x, weight, "rowwise" if rowwise else "tensorwise")
    want = F.linear(x, weight)
    assert y.shape == want.shape and y.dtype == torch.float32
    # e4m3 keeps 3 mantissa bits (~3.6% rms rounding per operand): the products are off by a few percent
    assert 0.005 < relative_error(y, want) < 0.06
    grads = torch.autograd.grad(y, (x, weight), grad)
    want_grads = torch.autograd.grad(want, (x, weight), grad)
    for g, w in zip(grads, want_grads, strict=True):
        assert g.dtype == w.dtype and 0.005 < relative_error(g, w) < 0.08  # e5m2 gradients (tensorwise): 2 bits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8_linear(x, weight, "rowwise" if rowwise else "tensorwise").dtype == torch.bfloat16


def test_rowwise_scales_keep_rows_that_one_scale_flushes_to_zero():
    """Rows spanning 1e-3 .. 1e3: with one scale for the tensor the small rows fall below e4m3's
    smallest value; a scale per row keeps every row to a few percent."""
    torch.manual_seed(0)
    a = torch.randn(32, 64) * torch.logspace(-3, 3, 32)[:, None]
    b = torch.randn(64, 16)
    exact = a @ b
    per_row = {rowwise: ((scaled_matmul(a, b, rowwise, E4M3, E4M3, torch.float32) - exact).norm(dim=1)
                         / exact.norm(dim=1)) for rowwise in (False, True)}  # fmt: skip
    assert per_row[False][0] > 0.9  # the smallest row is lost
    assert per_row[True].max() < 0.08


def test_shapes_scaled_mm_does_not_take_fall_back_to_f_linear():
    x, weight = torch.randn(3, 40), torch.randn(24, 40)  # 3 rows: not a multiple of 16
    assert torch.equal(fp8_linear(x, weight, "tensorwise"), F.linear(x, weight))


def test_conversion_leaves_the_head_and_trains_like_float32(data_dir, tmp_path, monkeypatch):
    model = TransformerLM(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=4))
    convert_to_fp8(model, "rowwise")
    assert not getattr(model.lm_head, "fp8", None)
    assert all(
        m.fp8 == "rowwise" for m in (model.layers[0].attn, model.layers[1].ffn, model.layers[0].attn.output_proj)
    )
    with pytest.raises(ValueError, match="expected one of tensorwise, rowwise"):
        convert_to_fp8(model, "fp4")

    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or scaled_mm(*a, **k))
    losses = {}
    for fp8 in ("none", "tensorwise"):
        train(tiny_config(data_dir, tmp_path / fp8, fp8=f'"{fp8}"'), quiet=True)
        losses[fp8] = [r["train/loss"] for r in read_metrics(tmp_path / fp8 / "metrics.jsonl") if "train/loss" in r]
        assert bool(calls) == (fp8 != "none")
    # 2 layers x (q|k|v, o, w1|w3, w2) x (forward, dx, dW) a step, 20 steps, plus evaluations' forwards
    assert len(calls) >= 20 * 2 * 4 * 3
    assert losses["tensorwise"] != losses["none"]  # it did change the arithmetic
    assert losses["tensorwise"][-1] < losses["tensorwise"][0]  # it trains
    for a, b in zip(losses["tensorwise"], losses["none"], strict=True):
        assert abs(a - b) <= 0.02 * b  # and follows float32's curve within 2%
