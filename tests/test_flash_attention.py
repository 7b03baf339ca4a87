"""FlashAttention-2 in PyTorch and in Triton against plain PyTorch attention in float64: the output,
the log-sum-exp L, dQ, dK and dV, causal and not, at lengths that do not divide the tiles.

The Triton kernels run on CPU under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py
before Triton is imported) where there is no GPU; it has no bfloat16, so bf16 runs only on a GPU.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.kernels.flash_attention import FlashAttention2, flash_backward, flash_forward

try:
    from scratchlm.kernels import flash_triton
except ImportError:
    flash_triton = None
needs_triton = pytest.mark.skipif(flash_triton is None, reason='needs Triton (pip install "scratchlm[triton]")')
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (batch, n_q, n_k, d, causal): one tile and several, lengths that are not multiples of 16, more keys than queries
SHAPES = [
    (2, 64, 64, 16, True),
    (2, 64, 64, 16, False),
    (2, 37, 37, 16, True),
    (1, 100, 100, 32, False),
    (3, 50, 83, 32, True),
    (2, 20, 70, 24, False),
]


def reference(q, k, v, causal):
    """softmax(q k^T / sqrt(d)) v and logsumexp of the scores, written out (float64 for the tests)."""
    scores = q @ k.mT / math.sqrt(q.shape[-1])
    if causal:
        n_q, n_k = scores.shape[-2:]
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        scores = scores.masked_fill(~keep, -math.inf)
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


def inputs(batch, n_q, n_k, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, d, generator=gen).to(dtype) for n in (n_q, n_k, n_k))
    grad_out = torch.randn(batch, n_q, d, generator=gen).to(dtype)
    return q, k, v, grad_out


def expected(q, k, v, grad_out, causal):
    """Output, L and (dQ, dK, dV) of the reference in float64 from the same (rounded) inputs."""
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out, lse = reference(q64, k64, v64, causal)
    grads = torch.autograd.grad(out, (q64, k64, v64), grad_out.double())
    return out.detach(), lse.detach(), grads


def assert_close(actual, wanted, tol, what):
    error = (actual.double().cpu() - wanted.cpu()).abs().max().item()
    assert error <= tol * max(1.0, wanted.abs().max().item()), f"{what}: max error {error:.2e} > {tol:.0e}"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tiles", [(16, 16), (32, 16), (16, 64)], ids=str)
def test_pytorch_tiles_match_the_reference(shape, tiles):
    batch, n_q, n_k, d, causal = shape
    q, k, v, grad_out = inputs(batch, n_q, n_k, d, torch.float64)
    out, lse = flash_forward(q, k, v, causal, *tiles)
    want_out, want_lse, _ = expected(q, k, v, grad_out, causal)
    assert_close(out, want_out, 1e-12, "O")
    assert_close(lse, want_lse, 1e-12, "L")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_pytorch_backward_by_recomputation_matches_the_reference(shape):
    batch, n_q, n_k, d, causal = shape
    q, k, v, grad_out = inputs(batch, n_q, n_k, d, torch.float64)
    out, lse = flash_forward(q, k, v, causal)
    _, _, want_grads = expected(q, k, v, grad_out, causal)
    grads = flash_backward(q, k, v, out, lse, grad_out, causal)
    for name, g, want in zip("QKV", grads, want_grads, strict=True):
        assert_close(g, want, 1e-11, f"d{name}")


@pytest.mark.parametrize("causal", [True, False])
def test_the_autograd_function_saves_only_q_k_v_the_output_and_the_log_sum_exp(causal):
    q, k, v, grad_out = inputs(2, 3 * 300, 3 * 300, 16, torch.float32)  # 300 per head: two 128-tiles and a part
    q, k, v = (t.reshape(2, 3, -1, 16).requires_grad_() for t in (q, k, v))  # (batch, heads, n, d)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = FlashAttention2.apply(q, k, v, causal)
    assert [tuple(t.shape) for t in saved] == [(2, 3, 300, 16)] * 4 + [(2, 3, 300)]
    assert saved[-1].dtype == torch.float32
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert_close(out.detach(), want.detach().double(), 1e-5, "O against F.scaled_dot_product_attention")
    grads = torch.autograd.grad(out, (q, k, v), grad_out.reshape(2, 3, -1, 16))
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out.reshape(2, 3, -1, 16))
    for name, g, w in zip("QKV", grads, want_grads, strict=True):
        assert_close(g, w.double(), 1e-5, f"d{name} against F.scaled_dot_product_attention")


def test_causal_attention_with_more_queries_than_keys_is_refused():
    q, k, v, _ = inputs(1, 20, 10, 16, torch.float32)
    with pytest.raises(ValueError, match="n_q <= n_k"):
        FlashAttention2.apply(q, k, v, True)


TRITON_DTYPES = [
    pytest.param(torch.float32, 2e-5, id="fp32"),
    pytest.param(torch.float16, 1e-2, id="fp16"),
    pytest.param(
        torch.bfloat16, 3e-2, id="bf16",
        marks=pytest.mark.skipif(DEVICE == "cpu", reason="the Triton interpreter has no bfloat16; runs on a GPU"),
    ),
]  # fmt: skip


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("dtype", "tol"), TRITON_DTYPES)
def test_triton_matches_the_reference(shape, dtype, tol):
    batch, n_q, n_k, d, causal = shape
    q, k, v, grad_out = (t.to(DEVICE) for t in inputs(batch, n_q, n_k, d, dtype))
    want_out, want_lse, want_grads = expected(q, k, v, grad_out, causal)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = flash_triton.triton_flash_attention_with_lse(q, k, v, causal)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (batch, n_q)
    assert_close(out, want_out, tol, "O")
    assert_close(lse, want_lse, tol, "L")
    out = flash_triton.triton_flash_attention(q, k, v, causal)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for name, g, want in zip("QKV", grads, want_grads, strict=True):
        assert g.dtype == dtype
        assert_close(g, want, 2 * tol, f"d{name}")


@needs_triton
def test_triton_takes_heads_as_leading_dimensions_and_strided_views():
    qkv = torch.randn(2, 70, 3 * 4 * 16, device=DEVICE)  # (batch, seq, q|k|v): the model's layout
    q, k, v = (t.unflatten(-1, (4, 16)).transpose(1, 2) for t in qkv.split(64, dim=-1))  # (b, h, s, d) views
    out = flash_triton.triton_flash_attention(q, k, v, True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == want.shape
    assert_close(out, want.double(), 2e-5, "O")


def test_the_faster_attention_is_chosen_once_per_shape_and_can_be_forced():
    from scratchlm.kernels import attention_choice

    timings = iter([2.0, 1.0, 1.0, 3.0])  # sdpa then triton, for each new shape
    timed = []

    def timer(fn):
        timed.append(fn)
        return next(timings)

    q = torch.randn(1, 2, 8, 16)
    assert attention_choice.choose(q, q, q, timer) == "triton"
    assert attention_choice.choose(q, q, q, timer) == "triton" and len(timed) == 2  # cached
    q2 = torch.randn(1, 2, 9, 16)
    assert attention_choice.choose(q2, q2, q2, timer) == "sdpa" and len(timed) == 4
    with attention_choice.forced("sdpa"):
        torch.testing.assert_close(attention_choice.causal_attention(q, q, q), F.scaled_dot_product_attention(
            q, q, q, is_causal=True))  # fmt: skip
    with pytest.raises(ValueError, match="one of"), attention_choice.forced("naive"):
        pass


@needs_triton
@pytest.mark.parametrize(("dtype", "tol"), TRITON_DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 64), (5, 100), (2, 48)], ids=str)  # d a power of two, or not
def test_triton_rms_norm_matches_pytorch(shape, dtype, tol):
    from scratchlm.kernels.fused_triton import TritonRMSNorm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(DEVICE, dtype).requires_grad_()
    grad = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    out = TritonRMSNorm.apply(x, weight, 1e-5)
    want = F.rms_norm(x.double(), shape[-1:], weight.double(), 1e-5)
    assert out.dtype == dtype
    assert_close(out, want.detach(), tol, "out")
    grads = torch.autograd.grad(out, (x, weight), grad)
    want_grads = torch.autograd.grad(want, (x, weight), grad.double())
    for name, g, w in zip(("dx", "dweight"), grads, want_grads, strict=True):
        assert_close(g, w, 4 * tol, name)


@needs_triton
@pytest.mark.parametrize(("dtype", "tol"), TRITON_DTYPES)
def test_triton_swiglu_matches_pytorch(dtype, tol):
    from scratchlm.kernels.fused_triton import TritonSwiGLU

    gen = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(3, 1500, generator=gen).to(DEVICE, dtype) for _ in range(3))  # two blocks and a part
    gate, up = gate.requires_grad_(), up.requires_grad_()
    out = TritonSwiGLU.apply(gate, up)
    want = F.silu(gate.double()) * up.double()
    assert_close(out, want.detach(), tol, "out")
    grads = torch.autograd.grad(out, (gate, up), grad)
    want_grads = torch.autograd.grad(want, (gate, up), grad.double())
    for name, g, w in zip(("dgate", "dup"), grads, want_grads, strict=True):
        assert_close(g, w, 2 * tol, name)


@needs_triton
@pytest.mark.parametrize(("dtype", "tol"), TRITON_DTYPES)
@pytest.mark.parametrize("grad", [True, False])
def test_triton_cross_entropy_rows_matches_pytorch(dtype, tol, grad, monkeypatch):
    """The LM head's per-row cross-entropy: losses in float32, and the gradient softmax - onehot written
    over the logits in their dtype, over a vocabulary that several blocks (and a part) cover."""
    from scratchlm.kernels import fused_triton

    monkeypatch.setattr(fused_triton, "CROSS_ENTROPY_BLOCK", 128)
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(6, 300, generator=gen)).to(DEVICE, dtype)
    targets = torch.randint(0, 300, (6,), generator=gen).to(DEVICE)
    want = F.cross_entropy(logits.double(), targets, reduction="none")
    want_grad = torch.softmax(logits.double(), dim=1) - F.one_hot(targets, 300)
    before = logits.clone()
    losses = fused_triton.triton_cross_entropy_rows_(logits, targets, grad)
    assert losses.dtype == torch.float32 and losses.shape == (6,)
    assert_close(losses, want, tol, "losses")
    if grad:
        assert logits.dtype == dtype
        assert_close(logits, want_grad, tol, "grad")
    else:
        assert torch.equal(logits, before)
