"""FlashAttention-2 in Triton: the algorithm of `flash_attention` (see there) as GPU kernels.

- `_forward`: one program per (query tile, batch row); it streams the key tiles through an online
  softmax and writes O and L. Causal: the key tiles wholly above the diagonal are never visited, the
  tiles below it run without a mask, and only those that cross the diagonal are masked.
- `_backward_kv`: one program per (key tile, batch row) accumulates dK and dV over the query tiles
  that can see that key tile; `_backward_q`: one per (query tile, batch row) accumulates dQ. Both
  recompute P = exp(S - L) from L; D = rowsum(dO * O) is computed first.
Tensors are (batch, n, d) with unit stride along d; d is padded to a power of two by masks. Written
with pointer arithmetic. Needs Triton (`pip install "scratchlm[triton]"`); runs on CPU under
`TRITON_INTERPRET=1` (float32 and float16: the interpreter has no bfloat16), which is how CI tests it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _scores(q, k_ptrs, offs_k, n_k, scale, offs_q, offset, MASK: tl.constexpr, D_MASK, IEEE: tl.constexpr):
    """S = q K^T * scale for one key tile, -inf where masked (keys past n_k; causal: keys after the query)."""
    k = tl.load(k_ptrs, mask=(offs_k[:, None] < n_k) & D_MASK, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision="ieee" if IEEE else "tf32") * scale
    if MASK:
        s = tl.where((offs_k[None, :] < n_k) & (offs_k[None, :] <= offs_q[:, None] + offset), s, float("-inf"))
    return s


@triton.jit
def _probabilities_and_grad_scores(
    q, k, v, do, lse, delta, offs_q, offs_k, n_q, n_k, offset, scale, CAUSAL: tl.constexpr, IEEE: tl.constexpr
):
    """Backward's recomputation for a (query tile, key tile) pair: P = exp(S - L), zero where masked,
    and dS = P * (dO V^T - D)."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee" if IEEE else "tf32") * scale  # (BQ, BK)
    keep = (offs_q[:, None] < n_q) & (offs_k[None, :] < n_k)
    if CAUSAL:
        keep = keep & (offs_k[None, :] <= offs_q[:, None] + offset)
    p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
    grad_p = tl.dot(do, tl.trans(v), input_precision="ieee" if IEEE else "tf32")
    return p, p * (grad_p - delta[:, None])


@triton.jit
def _forward(
    Q, K, V, OUT, LSE, stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn, stride_ob, stride_on,
    n_q, n_k, scale,
    D: tl.constexpr, D_PAD: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    tile, b = tl.program_id(0), tl.program_id(1)
    offs_q = tile * BQ + tl.arange(0, BQ)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d[None, :] < D
    q_mask = (offs_q[:, None] < n_q) & d_mask
    q = tl.load(Q + b * stride_qb + offs_q[:, None] * stride_qn + offs_d[None, :], mask=q_mask)
    m = tl.full((BQ,), float("-inf"), tl.float32)
    denominator = tl.zeros((BQ,), tl.float32)
    acc = tl.zeros((BQ, D_PAD), tl.float32)
    offset = n_k - n_q
    # Key tiles [0, unmasked) need no mask; [unmasked, end) cross the diagonal or n_k; the rest are skipped.
    end = n_k
    unmasked = (n_k // BK) * BK
    if CAUSAL:
        end = tl.minimum(n_k, tile * BQ + BQ + offset)
        unmasked = tl.minimum(unmasked, ((tile * BQ + offset + 1) // BK) * BK)
        unmasked = tl.maximum(unmasked, 0)
    for start in range(0, end, BK):
        offs_k = start + tl.arange(0, BK)
        k_ptrs = K + b * stride_kb + offs_k[:, None] * stride_kn + offs_d[None, :]
        if start < unmasked:
            s = _scores(q, k_ptrs, offs_k, n_k, scale, offs_q, offset, False, d_mask, IEEE)
        else:
            s = _scores(q, k_ptrs, offs_k, n_k, scale, offs_q, offset if CAUSAL else n_k, True, d_mask, IEEE)
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        denominator = alpha * denominator + tl.sum(p, 1)
        v = tl.load(V + b * stride_vb + offs_k[:, None] * stride_vn + offs_d[None, :],
                    mask=(offs_k[:, None] < n_k) & d_mask, other=0.0)  # fmt: skip
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee" if IEEE else "tf32")
        m = m_new
    out = acc / denominator[:, None]
    row_ok = offs_q < n_q
    tl.store(OUT + b * stride_ob + offs_q[:, None] * stride_on + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & d_mask)  # fmt: skip
    tl.store(LSE + b * n_q + offs_q, m + tl.log(denominator), mask=row_ok)


@triton.jit
def _backward_kv(
    Q, K, V, DO, L, DELTA, DK, DV, stride_b, stride_n, stride_kb, stride_kn,
    n_q, n_k, scale,
    D: tl.constexpr, D_PAD: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key tile. Q, DO share strides (stride_b, stride_n); K, V, DK, DV (stride_kb, stride_kn)."""
    tile, b = tl.program_id(0), tl.program_id(1)
    offs_k = tile * BK + tl.arange(0, BK)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d[None, :] < D
    kv_mask = (offs_k[:, None] < n_k) & d_mask
    kv_offsets = b * stride_kb + offs_k[:, None] * stride_kn + offs_d[None, :]
    k = tl.load(K + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_offsets, mask=kv_mask, other=0.0)
    grad_k = tl.zeros((BK, D_PAD), tl.float32)
    grad_v = tl.zeros((BK, D_PAD), tl.float32)
    offset = n_k - n_q
    begin = 0
    if CAUSAL:
        begin = (tl.maximum(tile * BK - offset, 0) // BQ) * BQ  # the first query tile that sees this key tile
    for start in range(begin, n_q, BQ):
        offs_q = start + tl.arange(0, BQ)
        row_ok = offs_q < n_q
        q_offsets = b * stride_b + offs_q[:, None] * stride_n + offs_d[None, :]
        q = tl.load(Q + q_offsets, mask=row_ok[:, None] & d_mask, other=0.0)
        do = tl.load(DO + q_offsets, mask=row_ok[:, None] & d_mask, other=0.0)
        lse = tl.load(L + b * n_q + offs_q, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + b * n_q + offs_q, mask=row_ok, other=0.0)
        p, grad_s = _probabilities_and_grad_scores(
            q, k, v, do, lse, delta, offs_q, offs_k, n_q, n_k, offset, scale, CAUSAL, IEEE
        )
        grad_v += tl.dot(tl.trans(p).to(do.dtype), do, input_precision="ieee" if IEEE else "tf32")
        grad_k += tl.dot(tl.trans(grad_s).to(q.dtype), q, input_precision="ieee" if IEEE else "tf32")
    tl.store(DK + kv_offsets, (grad_k * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offsets, grad_v.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _backward_q(
    Q, K, V, DO, L, DELTA, DQ, stride_b, stride_n, stride_kb, stride_kn,
    n_q, n_k, scale,
    D: tl.constexpr, D_PAD: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    """dQ of one query tile. Q, DO, DQ share strides (stride_b, stride_n); K, V (stride_kb, stride_kn)."""
    tile, b = tl.program_id(0), tl.program_id(1)
    offs_q = tile * BQ + tl.arange(0, BQ)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d[None, :] < D
    row_ok = offs_q < n_q
    q_offsets = b * stride_b + offs_q[:, None] * stride_n + offs_d[None, :]
    q = tl.load(Q + q_offsets, mask=row_ok[:, None] & d_mask, other=0.0)
    do = tl.load(DO + q_offsets, mask=row_ok[:, None] & d_mask, other=0.0)
    lse = tl.load(L + b * n_q + offs_q, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + b * n_q + offs_q, mask=row_ok, other=0.0)
    grad_q = tl.zeros((BQ, D_PAD), tl.float32)
    offset = n_k - n_q
    end = n_k
    if CAUSAL:
        end = tl.minimum(n_k, tile * BQ + BQ + offset)
    for start in range(0, end, BK):
        offs_k = start + tl.arange(0, BK)
        kv_offsets = b * stride_kb + offs_k[:, None] * stride_kn + offs_d[None, :]
        kv_mask = (offs_k[:, None] < n_k) & d_mask
        k = tl.load(K + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_offsets, mask=kv_mask, other=0.0)
        _, grad_s = _probabilities_and_grad_scores(
            q, k, v, do, lse, delta, offs_q, offs_k, n_q, n_k, offset, scale, CAUSAL, IEEE
        )
        grad_q += tl.dot(grad_s.to(k.dtype), k, input_precision="ieee" if IEEE else "tf32")
    tl.store(DQ + q_offsets, (grad_q * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_mask)


def _rows(x: Tensor) -> Tensor:
    """(..., n, d) -> (b, n, d) with unit stride along d."""
    x = x.reshape(-1, *x.shape[-2:])
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch_options(q: Tensor) -> dict:
    d = q.shape[-1]
    tile = 16 if d > 128 else 64  # registers: d x tile accumulators per program
    return {
        "D": d, "D_PAD": max(16, triton.next_power_of_2(d)), "BQ": tile, "BK": tile,
        "IEEE": q.dtype == torch.float32,
    }  # fmt: skip


def triton_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """q: (b, n_q, d), k, v: (b, n_k, d), unit stride along d -> O (b, n_q, d) in q's dtype, L (b, n_q) float32."""
    b, n_q, _ = q.shape
    n_k = k.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, n_q, device=q.device, dtype=torch.float32)
    opts = _launch_options(q)
    grid = (triton.cdiv(n_q, opts["BQ"]), b)
    _forward[grid](
        q, k, v, out, lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), n_q, n_k, 1 / math.sqrt(q.shape[-1]), CAUSAL=causal, **opts,
    )  # fmt: skip
    return out, lse


def triton_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV in the inputs' dtype; every tensor (b, n, d) contiguous, lse (b, n_q)."""
    b, n_q, _ = q.shape
    n_k = k.shape[1]
    delta = (grad_out.float() * out.float()).sum(-1)  # D: (b, n_q)
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    opts = _launch_options(q)
    scale = 1 / math.sqrt(q.shape[-1])
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1))
    _backward_kv[(triton.cdiv(n_k, opts["BK"]), b)](
        q, k, v, grad_out, lse, delta, grad_k, grad_v, *strides, n_q, n_k, scale, CAUSAL=causal, **opts
    )
    _backward_q[(triton.cdiv(n_q, opts["BQ"]), b)](
        q, k, v, grad_out, lse, delta, grad_q, *strides, n_q, n_k, scale, CAUSAL=causal, **opts
    )
    return grad_q, grad_k, grad_v


class TritonFlashAttention2(torch.autograd.Function):
    """softmax(Q K^T / sqrt(d)) V by the Triton kernels, saving Q, K, V, O and L (..., n_q) float32.
    q: (..., n_q, d), k, v: (..., n_k, d) -> (..., n_q, d); causal needs n_q <= n_k."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
        if causal and q.shape[-2] > k.shape[-2]:
            raise ValueError(f"causal attention needs n_q <= n_k, got {q.shape[-2]} queries for {k.shape[-2]} keys")
        q3, k3, v3 = (_rows(t).contiguous() for t in (q, k, v))
        out, lse = triton_forward(q3, k3, v3, causal)
        ctx.causal = causal
        ctx.save_for_backward(q3, k3, v3, out, lse)
        ctx.shapes = (q.shape, k.shape, v.shape)
        return out.reshape(q.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grads = triton_backward(q, k, v, out, lse, _rows(grad_out).contiguous(), ctx.causal)
        return *(g.reshape(shape) for g, shape in zip(grads, ctx.shapes, strict=True)), None


def triton_flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """`TritonFlashAttention2.apply`: q (..., n_q, d), k, v (..., n_k, d) -> (..., n_q, d)."""
    return TritonFlashAttention2.apply(q, k, v, causal)


def triton_flash_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> tuple[Tensor, Tensor]:
    """The forward alone: O (..., n_q, d) and L (..., n_q) float32."""
    out, lse = triton_forward(*(_rows(t).contiguous() for t in (q, k, v)), causal)
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])
