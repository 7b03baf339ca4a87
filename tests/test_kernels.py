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
