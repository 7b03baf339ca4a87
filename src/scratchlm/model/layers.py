"""The building blocks of the Transformer, written out: Linear, Embedding, RMSNorm, SwiGLU, RoPE,
softmax, dropout, scaled dot-product attention and causal multi-head self-attention.

PyTorch supplies tensors, autograd and the `nn.Module` / `nn.Parameter` containers. With `fused=True`
a module uses a fused kernel for the same math where one exists: our own C kernels on CPU
(`scratchlm.model.kernels`: RMSNorm, SwiGLU's activation, causal attention for short sequences), else
PyTorch's (`F.scaled_dot_product_attention`, `F.rms_norm`, `F.silu`, `F.dropout`); on CUDA, causal
attention is our Triton FlashAttention-2 where it beats SDPA at the shape (`kernels.attention_choice`).
Tests check every path against the written-out one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchlm.kernels import attention_choice
from scratchlm.model import kernels

# Merging the q, k and v projections into one matmul copies their weights on every call: worth it for
# training batches (thousands of rows), not for a prompt of a few tokens. (Decoding steps on CPU merge
# them, and w1|w3, from a cached copy: see DecodeWeight.)
MERGE_MIN_ROWS = 256


def _merge_pays(x: Tensor) -> bool:
    return x.numel() // x.shape[-1] >= MERGE_MIN_ROWS or _is_cpu_decode_step(x)


def _is_cpu_decode_step(x: Tensor) -> bool:
    """x: (batch, 1, d): one new position per sequence, no autograd, on CPU."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and x.dim() > 1 and x.shape[-2] == 1


def project(x: Tensor, weights: tuple[Tensor, ...], owner: nn.Module) -> Tensor:
    """x (..., d_in) times the stacked weights [W_1; W_2; ...]^T -> (..., sum of their d_out):
    several projections of the same input as one matmul.

    A decoding step on CPU multiplies by a `DecodeWeight` cached on `owner` (in `owner._decode`),
    rebuilt whenever a weight changes; an owner converted to FP8 training (`owner.fp8`) multiplies in
    float8 (`scratchlm.kernels.fp8`).
    """
    if _is_cpu_decode_step(x):
        kind = getattr(owner, "decode_weights", "float32")
        if owner._decode is None or not owner._decode.matches(weights, x, kind):
            owner._decode = DecodeWeight(weights, x, kind)
        return owner._decode.matmul(x)
    if getattr(owner, "fp8", None):  # set by `scratchlm.kernels.fp8.convert_to_fp8`
        from scratchlm.kernels.fp8 import fp8_linear

        return fp8_linear(x, stack_rows(weights), owner.fp8)
    return x @ stack_rows(weights).mT


def stack_rows(weights: tuple[Tensor, ...]) -> Tensor:
    """[W_1; W_2; ...]: (sum of d_out, d_in). A view where the weights already lie end to end in one
    buffer (as `scratchlm.distributed.fsdp` gathers a block's weights), else a copy."""
    if len(weights) == 1:
        return weights[0]
    base, end = weights[0]._base, weights[0].storage_offset()
    for w in weights:
        if (
            base is None
            or w._base is not base
            or not (w.is_contiguous() and base.is_contiguous())
            or w.storage_offset() != end
        ):
            return torch.cat(weights)
        end += w.numel()
    start = weights[0].storage_offset() - base.storage_offset()
    return base.reshape(-1)[start : start + end - weights[0].storage_offset()].view(-1, weights[0].shape[-1])


def trunc_normal_(weight: Tensor, std: float) -> Tensor:
    """Normal(0, std^2) cut at +-3 std."""
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


class Linear(nn.Module):
    """y = x W^T, no bias. weight: (d_out, d_in), init N(0, 2/(d_in + d_out)) cut at 3 std.

    A decoding step on CPU (no autograd, x: (batch, 1, d_in)) multiplies by a `DecodeWeight` instead.
    """

    def __init__(self, d_in: int, d_out: int, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in, device=device, dtype=dtype))
        trunc_normal_(self.weight, math.sqrt(2.0 / (d_in + d_out)))
        self._decode: DecodeWeight | None = None

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d_in) -> (..., d_out)"""
        return project(x, (self.weight,), self)

    def extra_repr(self) -> str:
        return f"d_in={self.weight.shape[1]}, d_out={self.weight.shape[0]}"


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class DecodeWeight:
    """x W^T for the few rows of a decoding step on CPU, W being one weight or several stacked
    ([W_q; W_k; W_v]). Each product reads the whole of W for a handful of FLOPs, so what counts is how
    fast the weights stream from memory; this keeps a copy of W laid out for that:

    - one row: W^T split by output columns into one (d_in, d_out / threads) slab per thread, run as
      one `bmm`, which PyTorch spreads over the threads (MKL's one-row product uses one thread);
    - several rows (batched decoding): oneDNN's linear with the weight pre-packed for that row count,
      2-3x MKL's small-M matmul here.
    Otherwise a contiguous W^T. Measured on the small shape's 70 MB of weights, 2-core EPYC, against
    x @ W^T: one row 4.0 -> 2.3 ms (stacked, split), 8 rows 10.0 -> 5.1 ms
    (benchmarks/generate_decode.py has the end-to-end figures).

    kind "int8" (`set_decode_weights`): W as int8 per output channel and x quantised per row, the
    product in `kernels.packed_linear`: a quarter of the bytes to stream; kind "bfloat16": W rounded to
    bf16, x and the sums float32: half the bytes (both packed by `kernels.pack_weight`).
    """

    def __init__(self, weights: tuple[Tensor, ...], x: Tensor, kind: str = "float32") -> None:
        self.key = self._key(weights, x, kind)
        w = torch.cat(weights).detach() if len(weights) > 1 else weights[0].detach()
        rows, threads = x.numel() // x.shape[-1], self.key[-2]
        d_out, d_in = w.shape
        self.kind = "transposed"
        if kind in ("int8", "bfloat16") and kernels.HAVE_C_INT8:
            self.kind, self.packed = kind, kernels.pack_weight(w, kind)
        elif kind == "int8":  # no C extension: the same arithmetic in PyTorch
            self.kind, (self.q, self.scale) = "int8-torch", kernels.quantize_int8(w)
        elif kind == "bfloat16":
            self.kind, self.packed = "bfloat16-torch", w.to(torch.bfloat16).contiguous()
        elif rows == 1 and threads > 1 and d_out % threads == 0:
            self.kind, self.packed = "split", w.reshape(threads, d_out // threads, d_in).mT.contiguous()
        elif rows > 1 and w.dtype == torch.float32 and _onednn_linear_available():
            self.kind, self.packed = "onednn", torch.ops.mkldnn._reorder_linear_weight(w, rows)
        else:
            self.packed = w.t().contiguous()

    @staticmethod
    def _key(weights: tuple[Tensor, ...], x: Tensor, kind: str) -> tuple:
        versions = tuple((w._version, w.data_ptr(), w.dtype) for w in weights)
        # one row or several: oneDNN's packed weight serves any row count (packed for the first seen), so a
        # batch that changes size every step (continuous batching) does not re-pack the weights
        return (*versions, min(x.numel() // x.shape[-1], 2), torch.get_num_threads(), kind)

    def matches(self, weights: tuple[Tensor, ...], x: Tensor, kind: str = "float32") -> bool:
        return self._key(weights, x, kind) == self.key

    def matmul(self, x: Tensor) -> Tensor:
        """x: (..., d_in) -> (..., d_out)"""
        if self.kind in ("int8", "bfloat16"):
            out = kernels.packed_linear(x.reshape(-1, x.shape[-1]), self.packed)
            return out.to(x.dtype).reshape(*x.shape[:-1], -1)
        if self.kind == "int8-torch":
            out = kernels.int8_linear(x.reshape(-1, x.shape[-1]).float().contiguous(), self.q, self.scale)
            return out.to(x.dtype).reshape(*x.shape[:-1], -1)
        if self.kind == "bfloat16-torch":
            out = kernels.bf16_linear(x.reshape(-1, x.shape[-1]).float().contiguous(), self.packed)
            return out.to(x.dtype).reshape(*x.shape[:-1], -1)
        if self.kind == "split":  # (threads, 1, d_in) @ (threads, d_in, d_out / threads): one slab per thread
            slabs = self.packed
            return torch.bmm(x.reshape(1, 1, -1).expand(slabs.shape[0], 1, -1), slabs).reshape(*x.shape[:-1], -1)
        if self.kind == "onednn":
            out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, None, "none", [], "")
            return out.reshape(*x.shape[:-1], -1)
        return x @ self.packed


DECODE_WEIGHTS = ("float32", "bfloat16", "int8")


def set_decode_weights(model: nn.Module, kind: str) -> None:
    """How `model`'s decoding steps on CPU multiply by their weights: "float32" (as trained), "bfloat16"
    or "int8" (per output channel, activations quantised per row; see DecodeWeight). Training, prompts and
    evaluation are untouched: only steps of one new position per sequence use it."""
    if kind not in DECODE_WEIGHTS:
        raise ValueError(f"decode weights: expected one of {', '.join(DECODE_WEIGHTS)}, got {kind!r}")
    for module in model.modules():
        if hasattr(module, "_decode"):
            module.decode_weights, module._decode = kind, None


class Embedding(nn.Module):
    """Lookup table. weight: (num_embeddings, d), init N(0, 1) cut at 3."""

    def __init__(self, num_embeddings: int, d: int, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, d, device=device, dtype=dtype))
        trunc_normal_(self.weight, 1.0)

    def forward(self, token_ids: Tensor) -> Tensor:
        """token_ids: (...) integer -> (..., d)"""
        return self.weight[token_ids]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * gain, computed in (at least) float32 and cast back. gain: (d,), init 1."""

    def __init__(self, d: int, eps: float = 1e-5, fused: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d) -> (..., d)"""
        in_dtype = x.dtype
        x = x.to(torch.promote_types(in_dtype, torch.float32))  # upcast bf16/fp16; never downcast fp64
        weight = self.weight.to(x.dtype)
        if self.fused:
            out = kernels.rms_norm(x, weight, self.eps)
        else:
            out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight
        return out.to(in_dtype)


def silu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class SwiGLU(nn.Module):
    """W2(SiLU(W1 x) * W3 x). w1, w3: (d_ff, d_model); w2: (d_model, d_ff).
    fused: SiLU(.) * . as one kernel (`kernels.swiglu_activation`)."""

    def __init__(self, d_model: int, d_ff: int, fused: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device, dtype)
        self.w2 = Linear(d_ff, d_model, device, dtype)
        self.w3 = Linear(d_model, d_ff, device, dtype)
        self.fused = fused
        self._decode: DecodeWeight | None = None

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d_model) -> (..., d_model)"""
        if not self.fused:  # written out
            return self.w2(silu(self.w1(x)) * self.w3(x))
        if _is_cpu_decode_step(x):  # one product with w1|w3 stacked (see DecodeWeight)
            gate, up = project(x, (self.w1.weight, self.w3.weight), self).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(kernels.swiglu_activation(gate, up))


def relu_squared(x: Tensor) -> Tensor:
    """max(x, 0)^2: ReLU^2 (So et al., 2021, "Primer"), the MLP activation of the nanoGPT speedrun."""
    return F.relu(x).square()


class UngatedFFN(nn.Module):
    """W2(act(W1 x)), act SiLU (the ungated baseline) or ReLU^2. w1: (d_ff, d_model); w2: (d_model, d_ff)."""

    def __init__(
        self, d_model: int, d_ff: int, fused: bool = False, device=None, dtype=None, activation: str = "silu"
    ) -> None:
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device, dtype)
        self.w2 = Linear(d_ff, d_model, device, dtype)
        self.activation = relu_squared if activation == "relu2" else F.silu if fused else silu

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.activation(self.w1(x)))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding: rotates each adjacent pair (x[2i], x[2i+1]) by the angle
    position * theta^(-2i/d), i.e. (x_even, x_odd) -> (x_even cos - x_odd sin, x_even sin + x_odd cos).

    Written as RoFormer does: each pair is a complex number x_even + i x_odd, multiplied by
    e^(i angle) — one complex multiply instead of four real ones (4x faster forward + backward on CPU).
    No parameters; e^(i angle) is precomputed for max_seq_len positions, stored as real (cos, sin)
    pairs so that casting the model (`model.to(torch.bfloat16)`) rounds it rather than dropping the
    imaginary part, as it would of a complex buffer.
    """

    def __init__(self, d_head: int, max_seq_len: int, theta: float = 10_000.0, device=None) -> None:
        super().__init__()
        if d_head % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {d_head}")
        inv_freq = theta ** (-torch.arange(0, d_head, 2, device=device, dtype=torch.float32) / d_head)
        angles = torch.arange(max_seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        rotations = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))  # (max_seq_len, d_head/2, 2)
        self.register_buffer("rotations", rotations, persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (..., seq, d_head), positions: (..., seq) or (seq,) integer -> (..., seq, d_head)"""
        rotations = torch.view_as_complex(self.rotations.float())[positions]  # (..., seq, d_head/2) complex
        real = x.to(torch.promote_types(x.dtype, torch.float32))  # complex needs fp32 or fp64
        pairs = torch.view_as_complex(real.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * rotations).flatten(-2).to(x.dtype)


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """exp(x - max) / sum(exp(x - max)): stable for any finite x, and for -inf entries."""
    shifted = x - x.amax(dim=dim, keepdim=True)
    exp = shifted.exp()
    return exp / exp.sum(dim=dim, keepdim=True)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """While training, zero each element with probability p and scale the rest by 1 / (1 - p), so the
    expected value is unchanged and evaluation needs no rescaling ("inverted" dropout). x: any shape."""
    if not training or p == 0:
        return x
    if p >= 1:
        return torch.zeros_like(x)
    return x * (torch.rand_like(x, dtype=torch.float32) >= p) / (1 - p)


class Dropout(nn.Module):
    """`dropout` as a module: on in training mode, the identity in evaluation mode.
    fused: PyTorch's one-kernel F.dropout (the same rule, a mask of bytes instead of a float draw)."""

    def __init__(self, p: float = 0.0, fused: bool = False) -> None:
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p, self.fused = p, fused

    def forward(self, x: Tensor) -> Tensor:
        if self.fused and self.training and self.p:
            return F.dropout(x, self.p, training=True)
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """softmax(q k^T / sqrt(d_k)) v, over any leading batch dimensions.

    q: (..., n_q, d_k), k: (..., n_k, d_k), v: (..., n_k, d_v), mask: (n_q, n_k) or broadcastable,
    True = attend. dropout_p: dropout on the attention weights. Returns (..., n_q, d_v).
    """
    scores = q @ k.mT / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return dropout(softmax(scores, dim=-1), dropout_p) @ v


@dataclass
class KVCache:
    """Keys and values of one layer for the tokens seen so far, pre-allocated to the context length.
    k, v: (batch, n_kv_heads, max_len, d_head); length: how many positions are filled (only those are
    ever read, so the rest starts uninitialised: a batch of rollouts' caches is ~30 MB to zero)."""

    k: Tensor
    v: Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, n_kv_heads: int, max_len: int, d_head: int, device=None, dtype=None) -> KVCache:
        shape = (batch, n_kv_heads, max_len, d_head)
        return cls(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v: (batch, n_kv_heads, n_new, d_head); return all keys and values so far."""
        end = self.length + k.shape[-2]
        if end > self.k.shape[-2]:
            raise ValueError(f"the KV cache holds {self.k.shape[-2]} positions; {end} requested")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, attend) -> Tensor:
        """Store the new k, v, then `attend(q, all keys, all values, key_mask)`."""
        return attend(q, *self.append(k, v), key_mask)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE on queries and keys and optional grouped-query
    attention (n_kv_heads < n_heads: each key/value head serves n_heads / n_kv_heads query heads).

    q_proj: (d_model, d_model); k_proj, v_proj: (n_kv_heads * d_head, d_model); output_proj: (d_model, d_model).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        rope: RotaryEmbedding | None = None,
        fused: bool = False,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"need n_heads | d_model and n_kv_heads | n_heads, got {d_model}, {n_heads}, {n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_model // n_heads
        self.q_proj = Linear(d_model, d_model, device, dtype)
        self.k_proj = Linear(d_model, n_kv_heads * self.d_head, device, dtype)
        self.v_proj = Linear(d_model, n_kv_heads * self.d_head, device, dtype)
        self.output_proj = Linear(d_model, d_model, device, dtype)
        self.rope = rope
        self.fused = fused
        self.dropout = dropout  # on the attention weights, while training
        self._decode: DecodeWeight | None = None

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        key_mask: Tensor | None = None,
        value_embedding: Tensor | None = None,
    ) -> Tensor:
        """x: (batch, seq, d_model) -> (batch, seq, d_model).

        positions: (seq,) or (batch, seq), default 0..seq-1. cache: this layer's KV cache; the new keys
        and values are appended and attention covers everything cached. key_mask: (batch, n_keys) bool,
        False for padding that no query may attend to (n_keys counts cached and new positions).
        value_embedding: (batch, seq, n_kv_heads * d_head), added to the values (`ModelConfig.value_embeddings`).
        """
        batch, seq, _ = x.shape
        kv_dim = self.n_kv_heads * self.d_head
        if self.fused and _merge_pays(x):  # one matmul for q, k and v (larger matmuls run closer to peak)
            qkv = project(x, (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight), self)
            if value_embedding is not None:
                qk, v = qkv.split((qkv.shape[-1] - kv_dim, kv_dim), dim=-1)
                qkv = torch.cat((qk, v + value_embedding), dim=-1)
            if positions is None and cache is None and key_mask is None and not (self.training and self.dropout):
                out = self._attend_in_c(qkv)  # whole sequences on CPU: RoPE and attention in one C kernel
                if out is not None:
                    return self.output_proj(out)
            q, k, v = qkv.split((self.n_heads * self.d_head, kv_dim, kv_dim), dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            if value_embedding is not None:
                v = v + value_embedding
        q = q.reshape(batch, seq, self.n_heads, self.d_head).transpose(1, 2)  # (b, h, s, d_head)
        k = k.reshape(batch, seq, self.n_kv_heads, self.d_head).transpose(1, 2)  # (b, h_kv, s, d_head)
        v = v.reshape(batch, seq, self.n_kv_heads, self.d_head).transpose(1, 2)
        if self.rope is not None:
            if positions is None:
                positions = torch.arange(seq, device=x.device)
            if positions.dim() == 2:
                positions = positions[:, None, :]  # broadcast over heads
            q, k = self.rope(q, positions), self.rope(k, positions)
        # (b, h, s, d_head); a cache decides how attention reads it (a paged one: through its block tables)
        out = self.attend(q, k, v, key_mask) if cache is None else cache.attend(q, k, v, key_mask, self.attend)
        return self.output_proj(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.d_head))

    def _attend_in_c(self, qkv: Tensor) -> Tensor | None:
        """Attention over positions 0..seq-1 by `kernels.causal_self_attention` where it applies, else None.
        qkv: (b, s, (n_heads + 2 n_kv_heads) d_head) -> (b, s, n_heads d_head)"""
        rotations = None if self.rope is None else self.rope.rotations[: qkv.shape[1]]
        if not kernels.causal_self_attention_applies(qkv, self.n_heads, self.n_kv_heads, rotations):
            return None
        return kernels.causal_self_attention(qkv, self.n_heads, self.n_kv_heads, rotations)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Causal attention where the n_q queries are the last n_q of the n_k keys' positions.
        q: (b, h, n_q, d), k/v: (b, h_kv, n_k, d), key_mask: (b, n_k) or None -> (b, h, n_q, d)"""
        n_q, n_k = q.shape[-2], k.shape[-2]
        grouped = self.n_kv_heads != self.n_heads
        p = self.dropout if self.training else 0.0
        if self.fused and n_q == 1 and key_mask is None:  # a decoding step: the one query sees every key
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=grouped)
        if self.fused and n_q == n_k and key_mask is None:
            if q.is_cuda and not (p or grouped):  # ours (Triton FlashAttention-2) where it is faster
                return attention_choice.causal_attention(q, k, v)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=grouped)
        mask = causal_mask(n_q, n_k, q.device)
        if key_mask is not None:
            # Padding is never attended to, except by itself (so a padding query's row is not empty).
            mask = (mask & key_mask[:, None, None, :]) | (mask & ~_strictly_before(n_q, n_k, q.device))
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=grouped)
        if grouped:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        return scaled_dot_product_attention(q, k, v, mask, p)


def _strictly_before(n_q: int, n_k: int, device=None) -> Tensor:
    """(n_q, n_k) True where key j lies strictly before query i's own position n_k - n_q + i."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(diagonal=n_k - n_q - 1)


def causal_mask(n_q: int, n_k: int, device=None) -> Tensor:
    """(n_q, n_k) boolean, True = attend: query i (at position n_k - n_q + i) sees keys 0..that position."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(diagonal=n_k - n_q)
