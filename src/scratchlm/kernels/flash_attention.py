"""FlashAttention-2 (Dao, 2023) in PyTorch: attention computed tile by tile with an online softmax, so
the (n_q x n_k) score matrix never exists whole, and a backward pass that recomputes it tile by tile
from what the forward kept: Q, K, V, the output O and each query's log-sum-exp L.

Forward, for each tile of keys K_j, V_j (size tile_k) against the query tiles that can see it:

    S = Q K_j^T / sqrt(d)                   scores of the tile (masked where causal forbids)
    m' = max(m, rowmax S)                   running row maximum
    P = exp(S - m')                         the tile's unnormalised probabilities
    l = exp(m - m') l + rowsum P            running softmax denominator
    O = exp(m - m') O + P V_j               running (unnormalised) output

then O / l, and L = m + log l. Backward, with D = rowsum(dO * O) (= rowsum(P * dP) per row), per key
tile: P = exp(Q K_j^T / sqrt(d) - L), dV_j = P^T dO, dP = dO V_j^T, dS = P * (dP - D), dQ += dS K_j / sqrt(d),
dK_j = dS^T Q / sqrt(d). The tile's backward is one function compiled with `torch.compile`.

Query tiles are a tensor dimension rather than a Python loop (one loop runs over the key tiles), so
the Python overhead is n_k / tile_k iterations. Causal attention aligns the queries with the last n_q
keys (query i sits at position n_k - n_q + i, as a KV cache's new tokens do); tiles that lie wholly
above the diagonal are skipped, and only the diagonal's are masked. Accumulation is in float32
(float64 for float64 inputs); the output takes the inputs' dtype, L stays in the accumulation dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TILE = 64  # queries and keys per tile; at least 16 (a tensor-core tile)


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


def _causal_mask(first_tile: int, n_tiles: int, tile_q: int, key_start: int, key_end: int, offset: int, device):
    """(n_tiles - first_tile, tile_q, key_end - key_start) True where the query may see the key, or None
    when every query of these tiles sees every key of this tile."""
    if first_tile * tile_q + offset >= key_end - 1:
        return None
    query_pos = torch.arange(first_tile * tile_q, n_tiles * tile_q, device=device) + offset
    keys = torch.arange(key_start, key_end, device=device)
    return (keys[None, :] <= query_pos[:, None]).unflatten(0, (n_tiles - first_tile, tile_q))


def flash_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, tile_q: int = TILE, tile_k: int = TILE
) -> tuple[Tensor, Tensor]:
    """q: (b, n_q, d), k, v: (b, n_k, d) -> O (b, n_q, d), L (b, n_q), both in `accumulation_dtype`."""
    n_q, d = q.shape[1:]
    n_k = k.shape[1]
    scale = 1 / math.sqrt(d)
    offset = n_k - n_q
    acc = accumulation_dtype(q)
    q_tiles = _tiles(q.to(acc), tile_q)  # (b, T, tile_q, d)
    n_tiles = q_tiles.shape[1]
    out = torch.zeros_like(q_tiles)
    row_max = q_tiles.new_full(q_tiles.shape[:-1], -math.inf)  # m: (b, T, tile_q)
    row_sum = torch.zeros_like(row_max)  # l
    for start in range(0, n_k, tile_k):
        end = min(start + tile_k, n_k)
        first = _first_query_tile(start, offset, tile_q, causal)
        if first >= n_tiles:
            break
        k_j, v_j = k[:, None, start:end].to(acc), v[:, None, start:end].to(acc)  # (b, 1, tile_k, d)
        scores = q_tiles[:, first:] @ k_j.mT * scale  # (b, T', tile_q, tile_k)
        mask = _causal_mask(first, n_tiles, tile_q, start, end, offset, q.device) if causal else None
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf)
        m_old = row_max[:, first:]
        m_new = torch.maximum(m_old, scores.amax(-1))
        p = torch.exp(scores - m_new[..., None])
        rescale = torch.exp(m_old - m_new)
        row_sum[:, first:] = rescale * row_sum[:, first:] + p.sum(-1)
        out[:, first:] = rescale[..., None] * out[:, first:] + p @ v_j
        row_max[:, first:] = m_new
    out = (out / row_sum[..., None]).flatten(1, 2)[:, :n_q]
    lse = (row_max + torch.log(row_sum)).flatten(1, 2)[:, :n_q]
    return out, lse


def _backward_tile(
    q: Tensor, grad_out: Tensor, lse: Tensor, delta: Tensor, k_j: Tensor, v_j: Tensor, mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One key tile's share of the gradients. q, grad_out: (b, T', tile_q, d); lse, delta: (b, T', tile_q);
    k_j, v_j: (b, 1, tile_k, d); mask: (T', tile_q, tile_k) or None -> dQ part (b, T', tile_q, d),
    dK_j, dV_j (b, tile_k, d)."""
    scores = q @ k_j.mT * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    p = torch.exp(scores - lse[..., None])  # the forward's probabilities, recomputed
    grad_v = torch.einsum("btqk,btqd->bkd", p, grad_out)
    grad_p = grad_out @ v_j.mT
    grad_s = p * (grad_p - delta[..., None])
    grad_q = grad_s @ k_j * scale
    grad_k = torch.einsum("btqk,btqd->bkd", grad_s, q) * scale
    return grad_q, grad_k, grad_v


_compiled_backward_tile = None


def backward_tile_fn():
    """`_backward_tile` compiled (once, with dynamic shapes); the plain function where compiling is off
    (`SCRATCHLM_COMPILE=0`)."""
    global _compiled_backward_tile
    if _compiled_backward_tile is None:
        import os

        if os.environ.get("SCRATCHLM_COMPILE", "1") == "0":
            _compiled_backward_tile = _backward_tile
        else:
            _compiled_backward_tile = torch.compile(_backward_tile, dynamic=True)
    return _compiled_backward_tile


def flash_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, causal: bool,
    tile_q: int = TILE, tile_k: int = TILE,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """dQ, dK, dV (in `accumulation_dtype`) from the forward's q, k, v (b, n, d), out (b, n_q, d),
    lse (b, n_q) and dO (b, n_q, d)."""
    b, n_q, d = q.shape
    n_k = k.shape[1]
    scale, offset = 1 / math.sqrt(d), n_k - n_q
    acc = accumulation_dtype(q)
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1)  # D: (b, n_q)
    q_t, do_t = _tiles(q.to(acc), tile_q), _tiles(grad_out.to(acc), tile_q)
    lse_t, delta_t = _tiles(lse, tile_q), _tiles(delta, tile_q)
    n_tiles = q_t.shape[1]
    grad_q = torch.zeros_like(q_t)
    grad_k = torch.zeros(b, n_k, d, device=q.device, dtype=acc)
    grad_v = torch.zeros_like(grad_k)
    tile_fn = backward_tile_fn()
    for start in range(0, n_k, tile_k):
        end = min(start + tile_k, n_k)
        first = _first_query_tile(start, offset, tile_q, causal)
        if first >= n_tiles:
            break
        mask = _causal_mask(first, n_tiles, tile_q, start, end, offset, q.device) if causal else None
        k_j, v_j = k[:, None, start:end].to(acc), v[:, None, start:end].to(acc)
        dq, grad_k[:, start:end], grad_v[:, start:end] = tile_fn(
            q_t[:, first:], do_t[:, first:], lse_t[:, first:], delta_t[:, first:], k_j, v_j, mask, scale
        )
        grad_q[:, first:] += dq
    return grad_q.flatten(1, 2)[:, :n_q], grad_k, grad_v


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
