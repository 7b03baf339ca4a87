"""Fused CPU kernels behind autograd: SwiGLU's activation, RMSNorm and the LM head's per-row
cross-entropy (`_kernels.c`), each in one pass over memory instead of PyTorch's several; and causal
attention for short sequences (`_attention.c`).

They apply to float32 CPU tensors laid out contiguously (attention: each row contiguous); on CUDA,
eager, RMSNorm and SwiGLU's activation take the Triton kernels of `scratchlm.kernels.fused_triton`
where Triton is installed; everything else (bf16 on CPU, strided views, an install without a C
compiler) takes the PyTorch expression, which the tests check them against.
Measured on the small benchmark shape (2048 rows, 2-core EPYC), forward + backward: SwiGLU's activation
(d_ff 1344) 7.1 -> 5.3 ms, RMSNorm (d 512) 3.4 -> 0.3 ms; the cross-entropy of a 419 x 10k block of
logits with its gradient 3.4 -> 1.9 ms. Causal self-attention with RoPE, forward + backward, against
our RoPE then PyTorch's flash attention (`benchmarks/attention.py`): (batch 16, 4 heads, 128 positions,
d_head 32) 7.3 -> 2.6 ms, (8, 16, 256, 32) 42 -> 21 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Imported after torch: they share its OpenMP threads (see _cpu.h). Each is optional: an install whose
# compiler could not build one (none at all, or one without OpenMP) takes PyTorch's operations instead.
try:
    from scratchlm.model import _kernels
except ImportError:
    _kernels = None
try:
    from scratchlm.model import _attention
except ImportError:
    _attention = None

try:
    from scratchlm.model import _quant
except ImportError:
    _quant = None

HAVE_C = _kernels is not None
HAVE_C_ATTENTION = _attention is not None
HAVE_C_INT8 = _quant is not None
INT8_MAX_ROWS = 16  # rows per call of the C kernel (a decoding step's batch)


def _float32_cpu_contiguous(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def available(*tensors: Tensor) -> bool:
    """Whether the C kernels of `_kernels.c` take these tensors: float32, on CPU, contiguous."""
    return HAVE_C and _float32_cpu_contiguous(*tensors)


class _SwiGLUActivation(torch.autograd.Function):
    """silu(gate) * up, saving only gate and up (autograd's own graph also keeps silu(gate)).
    The C kernels where they apply, else the same math in PyTorch operations."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        if not available(gate, up):
            return F.silu(gate) * up
        out = torch.empty_like(gate)
        _kernels.swiglu_forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), torch.get_num_threads())
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor]:
        gate, up = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if not available(gate, up, grad_out):
            sig = torch.sigmoid(gate)
            grad_up = grad_out * gate * sig
            return grad_out * up * sig * (1 + gate * (1 - sig)), grad_up
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        _kernels.swiglu_backward(
            gate.data_ptr(), up.data_ptr(), grad_out.data_ptr(), grad_gate.data_ptr(), grad_up.data_ptr(),
            gate.numel(), torch.get_num_threads(),
        )  # fmt: skip
        return grad_gate, grad_up


def triton_kernels_apply(*tensors: Tensor) -> bool:
    """Whether `scratchlm.kernels.fused_triton` takes these: CUDA tensors, Triton installed, and not while
    torch.compile traces (it fuses these operations itself)."""
    if not all(t.is_cuda for t in tensors) or torch.compiler.is_compiling():
        return False
    from scratchlm.kernels.attention_choice import triton_available

    return triton_available()


def swiglu_activation(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, elementwise. gate, up: (..., d_ff), the same shape."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up differ in shape: {tuple(gate.shape)} vs {tuple(up.shape)}")
    if triton_kernels_apply(gate, up):
        from scratchlm.kernels.fused_triton import TritonSwiGLU

        return TritonSwiGLU.apply(gate, up)
    return _SwiGLUActivation.apply(gate, up)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        d = x.shape[-1]
        rows = x.numel() // d
        out, rstd = torch.empty_like(x), x.new_empty(rows)
        threads = torch.get_num_threads()
        _kernels.rmsnorm_forward(
            x.data_ptr(), weight.data_ptr(), out.data_ptr(), rstd.data_ptr(), rows, d, eps, threads
        )
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        x, weight, rstd = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        d, rows, threads = x.shape[-1], rstd.numel(), torch.get_num_threads()
        grad_x, grad_weight_parts = torch.empty_like(x), x.new_empty(threads, d)
        parts = _kernels.rmsnorm_backward(
            x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), grad_out.data_ptr(), grad_x.data_ptr(),
            grad_weight_parts.data_ptr(), rows, d, threads,
        )  # fmt: skip
        return grad_x, grad_weight_parts[:parts].sum(0), None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2, last dim) + eps) * weight. x: (..., d), weight: (d,)."""
    if available(x, weight) and weight.shape == x.shape[-1:] and x.numel():
        return _RMSNorm.apply(x, weight, eps)
    if triton_kernels_apply(x, weight) and x.numel():
        from scratchlm.kernels.fused_triton import TritonRMSNorm

        return TritonRMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def cross_entropy_rows_(logits: Tensor, targets: Tensor, grad: bool) -> Tensor:
    """Per-row cross-entropy -log softmax(logits)_target, float32 (rows,); with `grad`, `logits` is
    overwritten by the loss's gradient with respect to it, softmax(logits) - onehot(target).
    logits: (rows, vocab), float32 (or, on CUDA with Triton, any float dtype), targets: (rows,) integer.
    The C kernel on CPU, the Triton one on CUDA, else PyTorch operations in float32."""
    if rows_kernel_takes(logits):
        from scratchlm.kernels.fused_triton import triton_cross_entropy_rows_

        return triton_cross_entropy_rows_(logits, targets, grad)
    if available(logits) and targets.dtype == torch.int64 and targets.is_contiguous():
        losses = logits.new_empty(logits.shape[0])
        _kernels.cross_entropy(
            logits.data_ptr(), targets.data_ptr(), losses.data_ptr(), *logits.shape, grad, torch.get_num_threads()
        )
        return losses
    # -log softmax(z)_t = log sum_j exp(z_j - max) + max - z_t, and softmax(z) from the same exp.
    z = logits.float()  # `logits` itself when float32, worked on in place
    target_logits = z.gather(1, targets[:, None])
    top = z.amax(dim=1, keepdim=True)
    exp = z.sub_(top).exp_()
    sums = exp.sum(dim=1, keepdim=True)
    if grad:
        exp.div_(sums)[torch.arange(len(targets), device=targets.device), targets] -= 1.0
        if exp is not logits:
            logits.copy_(exp)
    return (sums.log() + top - target_logits).squeeze(1)


def rows_kernel_takes(logits: Tensor) -> bool:
    """Whether `cross_entropy_rows_` reads `logits` in their own dtype (the Triton kernel, on CUDA); the
    other paths want float32."""
    return logits.stride(-1) == 1 and triton_kernels_apply(logits)


# Up to here the C attention beats PyTorch's (benchmarks/attention.py, 2-core EPYC, forward + backward:
# 2.8x at 128 positions, 2.0x at 512, 1.09x at 1024, 0.6x at 2048): its work per task grows as seq^2 in
# (seq x seq) scratch, where flash attention's tiles keep to the cache.
ATTENTION_MAX_SEQ = 1024


def _scratch(like: Tensor, seq: int, d: int, rows: int, squares: int) -> Tensor:
    padded = -(-seq // 16) * 16
    return like.new_empty(torch.get_num_threads() * (rows * padded * d + squares * padded * padded))


class _CausalSelfAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, rotations: Tensor | None, heads: int, kv_heads: int) -> Tensor:
        batch, seq, width = qkv.shape
        d = width // (heads + 2 * kv_heads)
        out, lse = qkv.new_empty(batch, seq, heads * d), qkv.new_empty(batch, heads, seq)
        scratch = _scratch(qkv, seq, d, _attention.FORWARD_ROWS, _attention.FORWARD_SQUARES)
        _attention.forward(
            qkv.data_ptr(), out.data_ptr(), lse.data_ptr(), 0 if rotations is None else rotations.data_ptr(),
            scratch.data_ptr(), batch, seq, heads, kv_heads, d, d**-0.5, torch.get_num_threads(),
        )  # fmt: skip
        ctx.save_for_backward(qkv, lse, rotations)
        ctx.heads, ctx.kv_heads = heads, kv_heads
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        qkv, lse, rotations = ctx.saved_tensors
        batch, seq, width = qkv.shape
        d = width // (ctx.heads + 2 * ctx.kv_heads)
        grad_out, grad_qkv = grad_out.contiguous(), torch.empty_like(qkv)
        scratch = _scratch(qkv, seq, d, _attention.BACKWARD_ROWS, _attention.BACKWARD_SQUARES)
        _attention.backward(
            qkv.data_ptr(), grad_out.data_ptr(), grad_qkv.data_ptr(), lse.data_ptr(),
            0 if rotations is None else rotations.data_ptr(), scratch.data_ptr(),
            batch, seq, ctx.heads, ctx.kv_heads, d, d**-0.5, torch.get_num_threads(),
        )  # fmt: skip
        return grad_qkv, None, None, None


def attention_kernel_fits(d_head: int, seq: int) -> bool:
    """Whether the C attention kernel is built and takes this shape: d_head a multiple of 16, at most
    ATTENTION_MAX_SEQ positions. (The accounting asks this too, to know what training keeps.)"""
    return HAVE_C_ATTENTION and d_head % 16 == 0 and seq <= ATTENTION_MAX_SEQ


def causal_self_attention_applies(qkv: Tensor, heads: int, kv_heads: int, rotations: Tensor | None) -> bool:
    """Whether `causal_self_attention` takes these: float32 on CPU, contiguous, a shape that
    `attention_kernel_fits`, and a rotation for each position."""
    d = qkv.shape[-1] // (heads + 2 * kv_heads)
    return (
        _float32_cpu_contiguous(qkv)
        and qkv.dim() == 3
        and attention_kernel_fits(d, qkv.shape[1])
        and (rotations is None or (_float32_cpu_contiguous(rotations) and rotations.shape == (qkv.shape[1], d // 2, 2)))
    )


def causal_self_attention(qkv: Tensor, heads: int, kv_heads: int, rotations: Tensor | None = None) -> Tensor:
    """Causal multi-head self-attention from the fused projection, in the C kernel (check
    `causal_self_attention_applies` first): softmax(rope(q) rope(k)^T / sqrt(d) + causal mask) v per head.

    qkv: (batch, seq, (heads + 2 kv_heads) d), the query heads, then the key heads, then the value heads
    (query head h reads key/value head h // (heads // kv_heads)). rotations: (seq, d/2, 2), RoPE's cos and
    sin per position and pair of dimensions (see RotaryEmbedding), or None for none.
    Returns (batch, seq, heads d), the heads merged."""
    return _CausalSelfAttention.apply(qkv, rotations, heads, kv_heads)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel: weight (d_out, d_in) ~ scale[:, None] * q, q in [-127, 127],
    scale = max |row| / 127 (1 for a row of zeros). Returns (q int8 (d_out, d_in), scale float32 (d_out,))."""
    w = weight.detach().float()
    top = w.abs().amax(dim=1)
    scale = torch.where(top > 0, top / 127, torch.ones_like(top))
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous(), scale.contiguous()


PACKED_KINDS = {"float32": 0, "bfloat16": 1, "int8": 2}  # the formats of _matvec.h
CHUNK_BYTES = 64


@dataclass
class PackedWeight:
    """W (d_out, d_in) laid out for the C products (`_matvec.h`): rows in groups of four, each row cut
    into 64-byte chunks, a group's four chunks side by side, so that four dot products read one
    sequential stream; zero-padded to whole chunks and groups. kind: "float32", "bfloat16" or "int8"
    (then `scale`, (d_out,): W ~ scale[:, None] * q)."""

    kind: str
    data: Tensor  # (groups, chunks, 4, chunk) in the kind's dtype
    scale: Tensor | None
    d_out: int
    d_in: int


def tile(w: Tensor) -> Tensor:
    """(d_out, d_in) -> (ceil(d_out / 4), chunks, 4, 64 bytes of elements): the tiled layout, zero-padded."""
    chunk = CHUNK_BYTES // w.element_size()
    d_out, d_in = w.shape
    groups, chunks = -(-d_out // 4), -(-d_in // chunk)
    padded = w.new_zeros(groups * 4, chunks * chunk)
    padded[:d_out, :d_in] = w
    return padded.view(groups, 4, chunks, chunk).transpose(1, 2).contiguous()


def panels(w: Tensor) -> Tensor:
    """(d_out, d_in) float32 -> (ceil(d_out / 16), d_in, 16): the panel layout of `_matvec.h`, for the
    products of many rows at once (outputs in panels of sixteen, each stored input by input)."""
    d_out, d_in = w.shape
    padded = w.detach().float().new_zeros(-(-d_out // 16) * 16, d_in)
    padded[:d_out] = w.detach()
    return padded.view(-1, 16, d_in).transpose(1, 2).contiguous()


def pack_weight(weight: Tensor, kind: str) -> PackedWeight:
    """`weight` (d_out, d_in) packed as `kind` for `packed_linear` and the decoding step."""
    w = weight.detach()
    if kind == "int8":
        q, scale = quantize_int8(w)
        return PackedWeight(kind, tile(q), scale, *w.shape)
    dtype = torch.bfloat16 if kind == "bfloat16" else torch.float32
    return PackedWeight(kind, tile(w.to(dtype)), None, *w.shape)


def packed_linear(x: Tensor, w: PackedWeight) -> Tensor:
    """x (rows, d_in) float32 times W^T -> (rows, d_out), float32, by `_quant.c` (int8: x quantised per
    row, sx = max |x_row| / 127, the products summed exactly in int32; bfloat16: the weights widened, the
    sums float32). Needs the C extension (`HAVE_C_INT8`)."""
    rows = x.shape[0]
    x = x.float().contiguous()
    y = torch.empty(rows, w.d_out)
    scale = 0 if w.scale is None else w.scale.data_ptr()
    for start in range(0, rows, INT8_MAX_ROWS):
        part = x[start : start + INT8_MAX_ROWS]
        _quant.linear(PACKED_KINDS[w.kind], part.data_ptr(), w.data.data_ptr(), scale, y[start:].data_ptr(),
                      len(part), w.d_in, w.d_out, torch.get_num_threads())  # fmt: skip
    return y


def int8_linear(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x (rows, d_in) float32 times (scale[:, None] * q)^T -> (rows, d_out), with x quantised to int8 per
    row (sx = max |x_row| / 127) and the products summed exactly in int32: `_quant.c` on CPU where it
    is built, else the same arithmetic in PyTorch (which the tests check it against). (Packs q on each
    call: decoding packs once, `pack_weight`.)"""
    if HAVE_C_INT8 and _float32_cpu_contiguous(x):
        return packed_linear(x, PackedWeight("int8", tile(q), scale.float().contiguous(), *q.shape))
    qx, sx = quantize_int8(x)
    return (qx.to(torch.int32) @ q.to(torch.int32).T).float() * sx[:, None] * scale


def bf16_linear(x: Tensor, w: Tensor) -> Tensor:
    """x (rows, d_in) float32 times w^T, w (d_out, d_in) bfloat16, summed in float32 -> (rows, d_out):
    `_quant.c` where it is built, else PyTorch on the weights widened to float32."""
    if HAVE_C_INT8 and _float32_cpu_contiguous(x):
        return packed_linear(x, PackedWeight("bfloat16", tile(w.to(torch.bfloat16)), None, *w.shape))
    return x @ w.float().T
