"""FlashAttention-2 (Dao, 2023) in PyTorch: a forward pass computed tile by tile with an online
softmax, so the (n_q x n_k) score matrix never exists whole, keeping only Q, K, V, the output O and
each query's log-sum-exp L; and a backward pass that recomputes the probabilities from them.

Forward, for each tile of keys K_j, V_j (size tile_k) against the query tiles that can see it:

    S = Q K_j^T / sqrt(d)                   scores of the tile (masked where causal forbids)
    m' = max(m, rowmax S)                   running row maximum
    P = exp(S - m')                         the tile's unnormalised probabilities
    l = exp(m - m') l + rowsum P            running softmax denominator
    O = exp(m - m') O + P V_j               running (unnormalised) output

then O / l, and L = m + log l. Query tiles are a tensor dimension rather than a Python loop (one loop
runs over the key tiles), so the Python overhead is n_k / tile_k iterations. Causal attention aligns
the queries with the last n_q keys (query i sits at position n_k - n_q + i, as a KV cache's new tokens
do); tiles that lie wholly above the diagonal are skipped, and only those that cross it are masked.

Backward, with D = rowsum(dO * O) (= rowsum(P * dP) per row): P = exp(Q K^T / sqrt(d) - L),
dV = P^T dO, dP = dO V^T, dS = P * (dP - D), dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d), as one
function compiled with `torch.compile` (whole, as the course's reference does: the Triton kernels
tile it). Accumulation is in float32 (float64 for float64 inputs); the output takes the inputs'
dtype, L stays in the accumulation dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TILE = 128  # queries and keys per tile, at least 16; on a 2-core CPU 128 runs the forward 1.8x faster than 64


def accumulation_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision inputs, else the inputs' own (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def _tiles(x: Tensor, tile: int) -> Tensor:
    """x: (b, n, ...) -> (b, ceil(n / tile), tile, ...), zero-padded at the end."""
    n = x.shape[1]
    padded = -(-n // tile) * tile
    if padded != n:
        x = torch.cat([x, x.new_zeros(x.shape[0], padded - n, *x.shape[2:])], dim=1)
    return x.unflatten(1, (padded // tile, tile))


def _first_query_tile(key_start: int, offset: int, tile_q: int, causal: bool) -> int:
    """The first query tile with a query that may see key `key_start` (query r sits at r + offset)."""
    return max(0, key_start - offset) // tile_q if causal else 0


def _crosses_diagonal(first_tile: int, tile_q: int, key_end: int, offset: int) -> bool:
    """Whether some query of tiles first_tile.. must not see some key before key_end (a mask is needed)."""
    return first_tile * tile_q + offset < key_end - 1


def _mask_future(scores: Tensor, first_tile: int, key_start: int, offset: int) -> Tensor:
    """scores: (b, T', tile_q, tile_k) of query tiles first_tile.. against keys key_start.. -> -inf where
    the key lies after the query's position."""
    n_tiles, tile_q, tile_k = scores.shape[1:]
    query_pos = torch.arange(n_tiles * tile_q, device=scores.device).view(n_tiles, tile_q) + first_tile * tile_q
    keys = torch.arange(tile_k, device=scores.device) + key_start
    return scores.masked_fill(keys > (query_pos + offset)[..., None], -math.inf)


def _forward_tile(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, row_max: Tensor, row_sum: Tensor,
    first: int, start: int, end: int, offset: int, scale: float, masked: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The online-softmax update by key tile start:end of query tiles first..: q, out (b, T, tile_q, d),
    row_max, row_sum (b, T, tile_q), k, v (b, n_k, d) -> the new out, row_max, row_sum of tiles first.."""
    k_j, v_j = k[:, None, start:end], v[:, None, start:end]  # (b, 1, tile_k, d)
    scores = q[:, first:] @ k_j.mT * scale  # (b, T', tile_q, tile_k)
    if masked:
        scores = _mask_future(scores, first, start, offset)
    m_old = row_max[:, first:]
    m_new = torch.maximum(m_old, scores.amax(-1))
    p = torch.exp(scores - m_new[..., None])
    rescale = torch.exp(m_old - m_new)
    return rescale[..., None] * out[:, first:] + p @ v_j, m_new, rescale * row_sum[:, first:] + p.sum(-1)


def _backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, scale: float, causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV by recomputing P = exp(Q K^T * scale - L): q, out, grad_out (b, n_q, d), k, v (b, n_k, d),
    lse (b, n_q), all in the accumulation dtype. Compiled, the elementwise steps fuse around the matmuls."""
    scores = q @ k.mT * scale  # (b, n_q, n_k)
    if causal:
        n_q, n_k = scores.shape[-2:]
        future = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(n_k - n_q + 1)
        scores = scores.masked_fill(future, -math.inf)
    p = torch.exp(scores - lse[..., None])  # the forward's probabilities, recomputed
    delta = (grad_out * out).sum(-1)  # D = rowsum(dO * O) = rowsum(P * dP)
    grad_v = p.mT @ grad_out
    grad_s = p * (grad_out @ v.mT - delta[..., None])
    return grad_s @ k * scale, grad_s.mT @ q * scale, grad_v


_compiled: dict = {}


def compiled(fn):
    """`fn` compiled once with dynamic shapes; the plain function where compiling is off
    (`SCRATCHLM_COMPILE=0`, read at each call)."""
    import os

    if os.environ.get("SCRATCHLM_COMPILE", "1") == "0":
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def _key_tiles(n_k: int, n_tiles: int, tile_q: int, tile_k: int, offset: int, causal: bool):
    """(first query tile, start, end, masked) for each key tile that some query sees."""
    for start in range(0, n_k, tile_k):
        end = min(start + tile_k, n_k)
        first = _first_query_tile(start, offset, tile_q, causal)
        if first >= n_tiles:
            return
        yield first, start, end, causal and _crosses_diagonal(first, tile_q, end, offset)


def flash_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, tile_q: int = TILE, tile_k: int = TILE
) -> tuple[Tensor, Tensor]:
    """q: (b, n_q, d), k, v: (b, n_k, d) -> O (b, n_q, d), L (b, n_q), both in `accumulation_dtype`."""
    n_q, d = q.shape[1:]
    n_k = k.shape[1]
    scale, offset, acc = 1 / math.sqrt(d), n_k - n_q, accumulation_dtype(q)
    q_t, k, v = _tiles(q.to(acc), tile_q), k.to(acc), v.to(acc)  # q_t: (b, T, tile_q, d)
    n_tiles = q_t.shape[1]
    out = torch.zeros_like(q_t)
    row_max = q_t.new_full(q_t.shape[:-1], -math.inf)  # m: (b, T, tile_q)
    row_sum = torch.zeros_like(row_max)  # l
    for first, start, end, masked in _key_tiles(n_k, n_tiles, tile_q, tile_k, offset, causal):
        out[:, first:], row_max[:, first:], row_sum[:, first:] = _forward_tile(
            q_t, k, v, out, row_max, row_sum, first, start, end, offset, scale, masked
        )
    out = (out / row_sum[..., None]).flatten(1, 2)[:, :n_q]
    lse = (row_max + torch.log(row_sum)).flatten(1, 2)[:, :n_q]
    return out, lse


def flash_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV (in `accumulation_dtype`) from the forward's q, k, v (b, n, d), out (b, n_q, d),
    lse (b, n_q) and dO (b, n_q, d), by `_backward` compiled."""
    acc = accumulation_dtype(q)
    scale = 1 / math.sqrt(q.shape[-1])
    return compiled(_backward)(
        q.to(acc), k.to(acc), v.to(acc), out.to(acc), lse.to(acc), grad_out.to(acc), scale, causal
    )


class FlashAttention2(torch.autograd.Function):
    """softmax(Q K^T / sqrt(d)) V, saving only Q, K, V, O and L for backward.

    q: (..., n_q, d), k, v: (..., n_k, d) with the same leading dimensions -> (..., n_q, d). Causal
    needs n_q <= n_k. After the forward, `ctx` holds L as `saved_tensors[-1]`: (..., n_q) float32.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
        if causal and q.shape[-2] > k.shape[-2]:
            raise ValueError(f"causal attention needs n_q <= n_k, got {q.shape[-2]} queries for {k.shape[-2]} keys")
        lead = q.shape[:-2]
        out, lse = flash_forward(q.flatten(0, -3), k.flatten(0, -3), v.flatten(0, -3), causal)
        out = out.to(q.dtype).reshape(q.shape)
        lse = lse.reshape(*lead, q.shape[-2])
        ctx.causal = causal
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grads = flash_backward(
            q.flatten(0, -3), k.flatten(0, -3), v.flatten(0, -3), out.flatten(0, -3), lse.flatten(0, -2),
            grad_out.flatten(0, -3), ctx.causal,
        )  # fmt: skip
        return *(g.to(t.dtype).reshape(t.shape) for g, t in zip(grads, (q, k, v), strict=True)), None


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """`FlashAttention2.apply`: q (..., n_q, d), k, v (..., n_k, d) -> (..., n_q, d)."""
    return FlashAttention2.apply(q, k, v, causal)


def flash_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> tuple[Tensor, Tensor]:
    """The forward alone (no autograd): O (..., n_q, d) in q's dtype and L (..., n_q) float32."""
    out, lse = flash_forward(q.flatten(0, -3), k.flatten(0, -3), v.flatten(0, -3), causal)
    return out.to(q.dtype).reshape(q.shape), lse.reshape(*q.shape[:-1])
