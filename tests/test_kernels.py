"""The fused CPU kernels (scratchlm.model.kernels) against PyTorch: SwiGLU's activation against
F.silu(gate) * up, RMSNorm against F.rms_norm, values and gradients, on the C path and the fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scratchlm.model import kernels

needs_c = pytest.mark.skipif(not kernels.HAVE_C, reason="the C extension is not built (no compiler at install)")

# (3, 5, 7): one thread, sizes that are not a multiple of the vector width; (64, 1000): split over threads.
SHAPES = [(3, 5, 7), (64, 1000), (2, 129, 384)]


def grads(fn, *inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def reference_swiglu(gate, up):
    return F.silu(gate) * up


@needs_c
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_activation_matches_torch(shape):
    torch.manual_seed(0)
    gate, up, grad_out = torch.randn(shape) * 4, torch.randn(shape), torch.randn(shape)
    assert kernels.available(gate, up)
    out, (grad_gate, grad_up) = grads(kernels.swiglu_activation, gate, up, grad_out=grad_out)
    ref_out, (ref_gate, ref_up) = grads(reference_swiglu, gate, up, grad_out=grad_out)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(grad_gate, ref_gate)
    torch.testing.assert_close(grad_up, ref_up)


@needs_c
def test_swiglu_activation_is_accurate_over_the_float_range():
    """Within 2e-7 relative of silu computed in float64 over [-87, 87] (PyTorch's float32 silu: 1.7e-7
    here), right to 1e-30 beyond it (where exp is clamped), and NaN in -> NaN out."""
    gate = torch.linspace(-87, 87, 100_001)
    out = kernels.swiglu_activation(gate, torch.ones_like(gate)).double()
    exact = gate.double() * torch.sigmoid(gate.double())
    relative = (out - exact).abs() / exact.abs().clamp_min(1e-30)
    assert relative.max() < 2e-7, relative.max()
    extremes = torch.tensor([-1e4, -100.0, -88.5, 88.5, 100.0, 1e4])
    out = kernels.swiglu_activation(extremes, torch.ones_like(extremes))
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.0, 88.5, 100.0, 1e4], abs=1e-30, rel=1e-7)
    nan = torch.tensor([float("nan"), 1.0])
    assert kernels.swiglu_activation(nan, torch.ones(2)).isnan().tolist() == [True, False]


@pytest.mark.parametrize("make", [lambda t: t.to(torch.float64), lambda t: t.mT])
def test_swiglu_activation_fallback_matches_torch(make):
    """Other dtypes and strided views take PyTorch operations, with the same saved tensors and gradients."""
    torch.manual_seed(0)
    gate, up, grad_out = (make(torch.randn(6, 10) * 3) for _ in range(3))
    assert not kernels.available(gate, up)
    out, (grad_gate, grad_up) = grads(kernels.swiglu_activation, gate, up, grad_out=grad_out)
    ref_out, (ref_gate, ref_up) = grads(reference_swiglu, gate, up, grad_out=grad_out)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(grad_gate, ref_gate)
    torch.testing.assert_close(grad_up, ref_up)


def test_swiglu_activation_rejects_different_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        kernels.swiglu_activation(torch.zeros(2, 3), torch.zeros(3, 2))


@needs_c
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 1e4, 1e-6])
def test_rms_norm_matches_torch(shape, scale):
    torch.manual_seed(0)
    x, grad_out = torch.randn(shape) * scale, torch.randn(shape)
    weight = torch.randn(shape[-1])
    assert kernels.available(x, weight)

    def ours(x, weight):
        return kernels.rms_norm(x, weight, 1e-5)

    def reference(x, weight):
        return F.rms_norm(x, x.shape[-1:], weight, 1e-5)

    out, (grad_x, grad_weight) = grads(ours, x, weight, grad_out=grad_out)
    ref_out, (ref_x, ref_weight) = grads(reference, x, weight, grad_out=grad_out)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(grad_x, ref_x, rtol=1e-5, atol=1e-5 / scale)
    torch.testing.assert_close(grad_weight, ref_weight, rtol=1e-5, atol=1e-5)


def test_rms_norm_fallback_and_empty_input():
    x, weight = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    assert not kernels.available(x, weight)
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5), F.rms_norm(x, (6,), weight, 1e-5))
    assert kernels.rms_norm(torch.zeros(0, 6), torch.ones(6), 1e-5).shape == (0, 6)


@pytest.mark.parametrize("use_c", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_cross_entropy_rows_matches_torch(use_c, rows, monkeypatch):
    """Losses against F.cross_entropy, and the logits overwritten by its gradient (x rows), C and fallback;
    finite for logits of 1e4."""
    if use_c and not kernels.HAVE_C:
        pytest.skip("the C extension is not built (no compiler at install)")
    monkeypatch.setattr(kernels, "HAVE_C", kernels.HAVE_C and use_c)
    torch.manual_seed(0)
    logits, targets = torch.randn(rows, 1003) * 5, torch.randint(0, 1003, (rows,))
    logits[0, :3] = torch.tensor([1e4, -1e4, 9999.0])
    leaf = logits.clone().requires_grad_()
    F.cross_entropy(leaf, targets, reduction="sum").backward()

    no_grad = logits.clone()
    losses = kernels.cross_entropy_rows_(no_grad, targets, grad=False)
    torch.testing.assert_close(losses, F.cross_entropy(logits, targets, reduction="none"))
    with_grad = logits.clone()
    torch.testing.assert_close(kernels.cross_entropy_rows_(with_grad, targets, grad=True), losses)
    torch.testing.assert_close(with_grad, leaf.grad)


def rotate_pairs(x, rotations):
    """(..., seq, d) with each pair (x[2m], x[2m+1]) turned by (cos, sin) = rotations[position, m]."""
    cos, sin = rotations[..., 0], rotations[..., 1]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def reference_self_attention(qkv, heads, kv_heads, rotations):
    """Split the heads, rotate, F.scaled_dot_product_attention(is_causal=True), merge the heads."""
    d = qkv.shape[-1] // (heads + 2 * kv_heads)
    q, k, v = qkv.split((heads * d, kv_heads * d, kv_heads * d), dim=-1)
    q, k, v = (t.unflatten(-1, (-1, d)).transpose(1, 2) for t in (q, k, v))
    if rotations is not None:
        q, k = rotate_pairs(q, rotations), rotate_pairs(k, rotations)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return out.transpose(1, 2).flatten(2)


# (batch, seq, heads, kv_heads, d_head, rope): a seq of 5 pads most of a 16-row block; 37 is no multiple of
# 4, 8 or 16; grouped and multi-query attention; 256 positions split over threads; d_head 64.
ATTENTION_SHAPES = [
    (2, 5, 2, 2, 16, True),
    (3, 37, 4, 2, 32, True),
    (2, 128, 4, 1, 32, False),
    (4, 256, 2, 2, 32, True),
    (1, 70, 2, 2, 64, True),
]


@pytest.mark.skipif(not kernels.HAVE_C_ATTENTION, reason="the C extension is not built (no compiler at install)")
@pytest.mark.parametrize(("batch", "seq", "heads", "kv_heads", "d", "rope"), ATTENTION_SHAPES)
def test_causal_self_attention_matches_torch(batch, seq, heads, kv_heads, d, rope):
    """The C kernel against F.scaled_dot_product_attention on explicitly rotated heads, in float64:
    the output and the gradient of qkv; with scores of several hundred (softmax must subtract the max)."""
    torch.manual_seed(0)
    qkv = torch.randn(batch, seq, (heads + 2 * kv_heads) * d, dtype=torch.float64)
    qkv[..., : heads * d] *= 4  # scores up to ~ 16 sqrt(d): far outside exp's float32 range unshifted
    angles = torch.arange(seq)[:, None] * 10_000.0 ** (-torch.arange(0, d, 2) / d)
    rotations = torch.stack((angles.cos(), angles.sin()), dim=-1) if rope else None
    grad_out = torch.randn(batch, seq, heads * d, dtype=torch.float64)

    expected, (expected_grad,) = grads(
        lambda t: reference_self_attention(t, heads, kv_heads, rotations), qkv, grad_out=grad_out
    )
    rotations32 = None if rotations is None else rotations.float()
    assert kernels.causal_self_attention_applies(qkv.float(), heads, kv_heads, rotations32)
    out, (grad,) = grads(
        lambda t: kernels.causal_self_attention(t, heads, kv_heads, rotations32), qkv.float(), grad_out=grad_out.float()
    )
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad.double(), expected_grad, atol=2e-4, rtol=1e-4)


def test_causal_self_attention_applies_only_where_the_kernel_can():
    """Else the module takes PyTorch's attention: other dtypes and devices, a strided qkv, d_head not a
    multiple of 16, too many positions, or rotations that do not match."""
    qkv, rotations = torch.randn(2, 8, 4 * 16), torch.randn(8, 8, 2)
    assert kernels.causal_self_attention_applies(qkv, 2, 1, rotations) == kernels.HAVE_C_ATTENTION
    assert kernels.causal_self_attention_applies(qkv, 2, 1, None) == kernels.HAVE_C_ATTENTION
    assert not kernels.causal_self_attention_applies(qkv.double(), 2, 1, rotations.double())
    assert not kernels.causal_self_attention_applies(qkv.mT.contiguous().mT, 2, 1, rotations)
    assert not kernels.causal_self_attention_applies(torch.randn(2, 8, 4 * 8), 2, 1, torch.randn(8, 4, 2))
    assert not kernels.causal_self_attention_applies(qkv, 2, 1, torch.randn(9, 8, 2))
    long = kernels.ATTENTION_MAX_SEQ + 1
    assert not kernels.causal_self_attention_applies(torch.randn(1, long, 64), 2, 1, None)
