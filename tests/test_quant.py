"""Int8 decoding: the quantiser's rounding bound, the C kernel against the same arithmetic in PyTorch and
against dequantised `F.linear`, and a model decoding with int8 weights against float32."""

import pytest
import torch
import torch.nn.functional as F

from scratchlm.model import ModelConfig, TransformerLM, kernels
from scratchlm.model.layers import set_decode_weights


def test_quantize_int8_rounds_each_channel_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(37, 100) * torch.rand(37, 1)  # channels of very different ranges
    w[5] = 0  # a row of zeros keeps scale 1 and q 0
    q, scale = kernels.quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and (q.abs().amax(1)[torch.arange(37) != 5] == 127).all()
    assert scale[5] == 1 and (q[5] == 0).all()
    assert ((scale[:, None] * q.float() - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("rows", [1, 3, 16, 21])  # 21: two calls of the C kernel (16 rows at most each)
@pytest.mark.parametrize("d_in", [64, 200, 1000])  # tails shorter than the SIMD blocks of 64 and 128 bytes
def test_int8_kernel_equals_the_same_arithmetic_in_pytorch(rows, d_in, monkeypatch):
    if not kernels.HAVE_C_INT8:
        pytest.skip("the C extension _quant is not built")
    torch.manual_seed(rows * d_in)
    x, w = torch.randn(rows, d_in), torch.randn(50, d_in)  # 50: groups of four output channels and a tail
    q, scale = kernels.quantize_int8(w)
    ours = kernels.int8_linear(x, q, scale)
    monkeypatch.setattr(kernels, "HAVE_C_INT8", False)
    torch.testing.assert_close(ours, kernels.int8_linear(x, q, scale), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("rows,d_in,d_out", [(1, 64, 48), (3, 203, 50), (8, 1000, 7)])  # lane tails; 4-channel tails
def test_bf16_kernel_against_linear_on_the_rounded_weights(rows, d_in, d_out, monkeypatch):
    torch.manual_seed(d_in)
    x, w = torch.randn(rows, d_in), torch.randn(d_out, d_in).to(torch.bfloat16)
    exact = F.linear(x.double(), w.double())
    ours = kernels.bf16_linear(x, w)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(kernels, "HAVE_C_INT8", False)
    torch.testing.assert_close(kernels.bf16_linear(x, w).double(), exact, rtol=1e-5, atol=1e-5)


def test_int8_product_against_dequantised_linear_within_the_activation_rounding():
    """With W = scale * q exactly, the only error left is x's rounding: |y - x W^T| <= sum_i |W_oi| sx / 2."""
    torch.manual_seed(0)
    x, w = torch.randn(5, 512) * 3, torch.randn(300, 512) * 0.05
    q, scale = kernels.quantize_int8(w)
    dequantised = scale[:, None] * q.float()
    y = kernels.int8_linear(x, q, scale)
    sx = x.abs().amax(1) / 127
    bound = (sx[:, None] / 2) * dequantised.abs().sum(1)[None, :]
    exact = F.linear(x.double(), dequantised.double()).float()
    assert ((y - exact).abs() <= bound * 1.001 + 1e-5).all()
    assert (y - exact).abs().max() > 0  # the activations really are quantised
    assert (y - F.linear(x, w)).norm() / F.linear(x, w).norm() < 0.02


@torch.no_grad()
def test_decoding_with_int8_weights_follows_float32():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, context_length=64, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2)
    model = TransformerLM(config).eval()
    ids = torch.randint(0, 300, (2, 24))

    def decode_logits() -> torch.Tensor:
        caches = model.new_caches(2)
        steps = [model(ids[:, :1], torch.tensor([0]), caches)]
        for t in range(1, ids.shape[1]):  # one position a step: the decoding path
            steps.append(model(ids[:, t : t + 1], torch.tensor([t]), caches))
        return torch.cat(steps, dim=1)

    full = decode_logits()
    torch.testing.assert_close(full, model(ids), rtol=1e-4, atol=1e-4)
    set_decode_weights(model, "int8")
    int8 = decode_logits()
    assert 0 < (int8 - full).norm() / full.norm() < 0.03
    torch.testing.assert_close(model(ids), full, rtol=1e-4, atol=1e-4)  # whole sequences stay float32
    with torch.no_grad():  # a changed weight is re-quantised
        model.lm_head.weight.mul_(2)
    assert (decode_logits() - 2 * int8).norm() / int8.norm() < 1e-5
    set_decode_weights(model, "bfloat16")
    bf16 = decode_logits()
    assert 0 < (bf16 - model(ids)).norm() / model(ids).norm() < 0.01
    set_decode_weights(model, "float32")
    torch.testing.assert_close(decode_logits(), model(ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="decode weights: expected one of float32, bfloat16, int8, got 'int4'"):
        set_decode_weights(model, "int4")


def test_every_instruction_set_path_gives_the_same_products(tmp_path):
    """AVX-512 (VNNI for int8), AVX2 and plain C, as this CPU has them ($SCRATCHLM_SIMD caps the choice),
    on 7 rows (AVX-512 takes four at a time, then one by one): int8 products are integer sums, so every
    path gives the same bits; bf16 ones differ only in the order
    of float32 additions."""
    import subprocess
    import sys

    if not kernels.HAVE_C_INT8:
        pytest.skip("the C extension _quant is not built")
    script = (
        "import sys, torch; from scratchlm.model import kernels\n"
        "torch.manual_seed(0); x, w = torch.randn(7, 203), torch.randn(50, 203)\n"
        "q, s = kernels.quantize_int8(w)\n"
        "torch.save({'paths': (kernels._quant.PATH, kernels._quant.BF16_PATH), 'int8': kernels.int8_linear(x, q, s),"
        " 'bf16': kernels.bf16_linear(x, w.to(torch.bfloat16))}, sys.argv[1])\n"
    )
    results = {}
    for cap in ("", "avx2", "c"):
        out = tmp_path / f"{cap or 'best'}.pt"
        env = {**__import__("os").environ, "SCRATCHLM_SIMD": cap}
        done = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        results[cap] = torch.load(out)
    assert results["c"]["paths"] == ("c", "plain")
    for cap in ("", "avx2"):
        assert torch.equal(results[cap]["int8"], results["c"]["int8"]), results[cap]["paths"]
        torch.testing.assert_close(results[cap]["bf16"], results["c"]["bf16"], rtol=1e-5, atol=1e-5)
