"""Every module against a reference built from torch.nn.functional, on random inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.model import kernels
from scratchlm.model.config import default_d_ff
from scratchlm.model.layers import (
    CausalSelfAttention,
    Dropout,
    Embedding,
    KVCache,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    UngatedFFN,
    causal_mask,
    scaled_dot_product_attention,
    softmax,
    stack_rows,
)

torch.manual_seed(0)


def test_linear_and_its_init():
    layer = Linear(300, 200)
    x = torch.randn(4, 7, 300)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    std = math.sqrt(2 / 500)
    assert layer.weight.shape == (200, 300)
    assert abs(layer.weight.std().item() - std * 0.986) < 0.02 * std  # cutting at 3 std shrinks std by 1.4%
    assert layer.weight.abs().max() <= 3 * std


def test_embedding():
    emb = Embedding(100, 16)
    ids = torch.randint(0, 100, (3, 5))
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight))
    assert emb.weight.abs().max() <= 3


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm(fused, dtype):
    norm = RMSNorm(64, fused=fused)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = (torch.randn(2, 9, 64) * 5).to(dtype).requires_grad_()
    expected = F.rms_norm(x.float(), (64,), norm.weight, eps=1e-5).to(dtype)
    out = norm(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    for ours, theirs in zip(
        torch.autograd.grad(out, [x, norm.weight], grad_out),
        torch.autograd.grad(expected, [x, norm.weight], grad_out),
        strict=True,
    ):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("fused", [False, True])
def test_swiglu_and_d_ff(fused):
    ffn = SwiGLU(64, 192, fused=fused)
    x = torch.randn(2, 5, 64, requires_grad=True)
    out = ffn(x)
    expected = F.linear(F.silu(F.linear(x, ffn.w1.weight)) * F.linear(x, ffn.w3.weight), ffn.w2.weight)
    torch.testing.assert_close(out, expected)
    grad_out, params = torch.randn_like(out), [x, ffn.w1.weight, ffn.w2.weight, ffn.w3.weight]
    for ours, theirs in zip(
        torch.autograd.grad(out, params, grad_out), torch.autograd.grad(expected, params, grad_out), strict=True
    ):
        torch.testing.assert_close(ours, theirs)
    assert default_d_ff(512) == 1344 and default_d_ff(128) == 320 and default_d_ff(768) == 2048


@pytest.mark.parametrize("activation", ["silu", "relu2"])
@pytest.mark.parametrize("fused", [False, True])
def test_ungated_ffn(activation, fused):
    ffn = UngatedFFN(64, 256, fused=fused, activation=activation)
    x = torch.randn(2, 5, 64, requires_grad=True)
    out = ffn(x)
    hidden = F.linear(x, ffn.w1.weight)
    act = F.silu(hidden) if activation == "silu" else torch.where(hidden > 0, hidden * hidden, 0.0)
    expected = F.linear(act, ffn.w2.weight)
    torch.testing.assert_close(out, expected)
    grad_out, params = torch.randn_like(out), [x, ffn.w1.weight, ffn.w2.weight]
    for ours, theirs in zip(
        torch.autograd.grad(out, params, grad_out), torch.autograd.grad(expected, params, grad_out), strict=True
    ):
        torch.testing.assert_close(ours, theirs)


def test_softmax_is_stable():
    x = torch.randn(3, 10) * 1000
    torch.testing.assert_close(softmax(x, -1), F.softmax(x, -1))
    x[0, 3] = float("-inf")
    torch.testing.assert_close(softmax(x, -1), F.softmax(x, -1))
    assert torch.isfinite(softmax(torch.full((4,), 1e4), 0)).all()


def test_attention_with_any_leading_dims():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True  # every query attends somewhere
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    )
    q2 = torch.randn(4, 5, 8)  # a single leading dim
    torch.testing.assert_close(scaled_dot_product_attention(q2, q2, q2), F.scaled_dot_product_attention(q2, q2, q2))


def reference_rope(x, positions, theta):
    """RoPE with real arithmetic: (x_even, x_odd) -> (x_even cos - x_odd sin, x_even sin + x_odd cos)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2).float() / d)
    angles = positions[..., None].float() * freqs
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def test_rope_matches_real_rotation_and_positions_drive_it():
    rope = RotaryEmbedding(16, 64, theta=10000.0)
    x = torch.randn(2, 10, 16)
    positions = torch.arange(10)
    torch.testing.assert_close(rope(x, positions), reference_rope(x, positions, 10000.0))
    shifted = torch.arange(5, 15)
    torch.testing.assert_close(rope(x, shifted), reference_rope(x, shifted, 10000.0))
    torch.testing.assert_close(rope(x, positions).norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_rope_survives_casting_the_module_to_bfloat16():
    rope = RotaryEmbedding(16, 64).to(torch.bfloat16)
    x, positions = torch.randn(2, 10, 16, dtype=torch.bfloat16), torch.arange(10)
    expected = reference_rope(x.float(), positions, 10000.0).to(torch.bfloat16)
    torch.testing.assert_close(rope(x, positions), expected, rtol=0.02, atol=0.02)


def reference_attention(x, attn, positions, n_heads, n_kv_heads, theta):
    b, s, d = x.shape
    dh = d // n_heads
    q = F.linear(x, attn.q_proj.weight).view(b, s, n_heads, dh).transpose(1, 2)
    k = F.linear(x, attn.k_proj.weight).view(b, s, n_kv_heads, dh).transpose(1, 2)
    v = F.linear(x, attn.v_proj.weight).view(b, s, n_kv_heads, dh).transpose(1, 2)
    q, k = reference_rope(q, positions, theta), reference_rope(k, positions, theta)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.linear(out.transpose(1, 2).reshape(b, s, d), attn.output_proj.weight)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_causal_self_attention(fused, n_kv_heads):
    rope = RotaryEmbedding(8, 32)
    attn = CausalSelfAttention(32, 4, n_kv_heads, rope, fused=fused)
    x = torch.randn(2, 11, 32)
    positions = torch.arange(11)
    torch.testing.assert_close(attn(x, positions), reference_attention(x, attn, positions, 4, n_kv_heads, 10000.0))


@pytest.mark.skipif(not kernels.HAVE_C_ATTENTION, reason="the C extension is not built (no compiler at install)")
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_fused_attention_takes_the_c_kernel_for_whole_sequences_on_cpu(n_kv_heads, monkeypatch):
    """Training-sized batches (>= MERGE_MIN_ROWS rows) on CPU go through kernels.causal_self_attention,
    with the values and every gradient of the reference. Not with dropout while training, or a KV cache."""
    c_attention, calls = kernels.causal_self_attention, []
    monkeypatch.setattr(kernels, "causal_self_attention", lambda *args: calls.append(1) or c_attention(*args))
    torch.manual_seed(0)
    attn = CausalSelfAttention(64, 4, n_kv_heads, RotaryEmbedding(16, 64), fused=True)
    x = torch.randn(8, 40, 64)  # 320 rows
    params = list(attn.parameters())
    expected = values_and_grads(lambda t: reference_attention(t, attn, torch.arange(40), 4, n_kv_heads, 1e4), x, params)
    got = values_and_grads(attn, x, params)
    assert calls == [1]
    for a, b in zip(got, expected, strict=True):
        # float32 gradients summed over 320 rows in another order: an unseeded run once differed by 1.1e-5
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)
    attn.dropout = 0.1
    attn(x)
    assert calls == [1]
    attn.eval()  # dropout off
    attn(x)
    attn(x, cache=KVCache.empty(8, n_kv_heads, 40, 16))
    assert calls == [1, 1]


def values_and_grads(fn, x, params):
    """[fn(x), then the gradients of x and of params] for a fixed random gradient of the output."""
    x = x.detach().clone().requires_grad_()
    for p in params:
        p.grad = None
    out = fn(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return [out.detach(), x.grad, *(p.grad for p in params)]


def test_fused_and_plain_attention_agree_on_a_suffix_of_queries():
    attn = CausalSelfAttention(32, 4, 2, RotaryEmbedding(8, 32))
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    plain = attn.attend(q, k, v)
    attn.fused = True
    torch.testing.assert_close(attn.attend(q, k, v), plain)
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]


@pytest.mark.parametrize("fused", [False, True])  # written out, and F.dropout
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_zeroes_a_fraction_p_and_scales_the_rest(fused, p):
    drop = Dropout(p, fused=fused)
    x = torch.rand(1000, 1000) + 1  # no zeros of its own
    out = drop(x)
    zeroed = out == 0
    assert abs(zeroed.float().mean().item() - p) < 0.005  # 1e6 draws: the standard error is <= 0.0005
    torch.testing.assert_close(out[~zeroed], x[~zeroed] / (1 - p))
    assert not torch.equal(drop(x), out)  # a fresh mask each call
    drop.eval()
    assert drop(x) is x and Dropout(0.0, fused)(x) is x


@pytest.mark.parametrize("fused", [False, True])
def test_attention_dropout_keeps_the_expected_output(fused):
    """Averaged over many masks, dropout on the attention weights gives the output without it (the
    weights are scaled by 1 / (1 - p)); in evaluation mode it is off."""
    attn = CausalSelfAttention(8, 2, rope=RotaryEmbedding(4, 8), fused=fused, dropout=0.3)
    q, k, v = torch.randn(3, 1, 2, 6, 4).unbind(0)
    attn.eval()
    exact = attn.attend(q, k, v)
    attn.train()
    draws = torch.stack([attn.attend(q, k, v) for _ in range(4000)])
    assert not torch.allclose(draws[0], exact)
    standard_error = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - exact).abs() <= 5 * standard_error + 1e-6).all()


@pytest.mark.parametrize(
    ("x_shape", "d_out", "kind"),
    [((1, 1, 16), 8, "split"), ((1, 16), 8, "split"), ((4, 1, 16), 8, "onednn"), ((1, 1, 16), 7, "transposed")],
)
def test_linear_decode_path_matches_and_follows_weight_changes(x_shape, d_out, kind):
    """A CPU decoding step (one position per sequence, no autograd) multiplies by a cached DecodeWeight."""
    if kind == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch has no oneDNN")
    layer = Linear(16, d_out)
    x = torch.randn(x_shape)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
        assert layer._decode.kind == (kind if torch.get_num_threads() > 1 or kind != "split" else "transposed")
        layer.weight.mul_(2)  # an in-place update (what an optimizer step does)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
        layer.load_state_dict({"weight": torch.randn(d_out, 16)})
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))


def test_weights_end_to_end_in_one_buffer_stack_as_a_view_with_the_same_gradients():
    """`stack_rows` of views that lie end to end (as FSDP gathers a block) is a view of their buffer, not
    a copy that backward would keep; values and gradients equal torch.cat's."""
    buffer = torch.randn(3 * 4 * 5, requires_grad=True)
    views = tuple(part.view(4, 5) for part in buffer.split(20))
    stacked = stack_rows(views)
    assert stacked.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    torch.testing.assert_close(stacked, torch.cat(views), rtol=0, atol=0)
    x = torch.randn(7, 5)
    (grad,) = torch.autograd.grad((x @ stacked.mT).square().sum(), buffer)
    (expected,) = torch.autograd.grad((x @ torch.cat(views).mT).square().sum(), buffer)
    torch.testing.assert_close(grad, expected)
    apart = (views[0], views[2])  # not end to end: a copy
    assert stack_rows(apart).untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
    torch.testing.assert_close(stack_rows(apart), torch.cat(apart), rtol=0, atol=0)
