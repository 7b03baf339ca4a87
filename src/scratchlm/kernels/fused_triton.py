"""Fused GPU kernels in Triton for the training step's elementwise and row-wise work, each one pass
over memory where PyTorch's eager expressions make several: RMSNorm (forward and backward),
SwiGLU's activation silu(gate) * up (forward and backward), and the LM head's per-row cross-entropy
with its gradient written over the logits (the GPU twin of the C kernel `model.head` uses on the CPU).
Each is tested against the PyTorch expression it replaces (on CPU under `TRITON_INTERPRET=1`).

Rows are (rows, d) with unit stride along d, one program per row (RMSNorm, cross-entropy) or per block
of elements (SwiGLU); reductions in float32 whatever the dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rms_norm_forward(X, W, OUT, RSTD, d, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < d
    x = tl.load(X + row * d + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1 / tl.sqrt(tl.sum(x * x, 0) / d + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * d + cols, (x * rstd * w).to(OUT.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_backward(X, W, RSTD, GRAD_OUT, GRAD_X, GRAD_W_ROWS, d, BLOCK: tl.constexpr):
    """dx = rstd (w dy - x rstd^2 mean(x w dy)); this row's share of dw = dy x rstd."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < d
    x = tl.load(X + row * d + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(GRAD_OUT + row * d + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    wdy = w * dy
    dx = rstd * (wdy - x * rstd * rstd * tl.sum(x * wdy, 0) / d)
    tl.store(GRAD_X + row * d + cols, dx.to(GRAD_X.dtype.element_ty), mask=mask)
    tl.store(GRAD_W_ROWS + row * d + cols, dy * x * rstd, mask=mask)


class TritonRMSNorm(torch.autograd.Function):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension. x: (..., d), weight: (d,)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out, rstd = torch.empty_like(rows), torch.empty(rows.shape[0], device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(rows.shape[1])
        _rms_norm_forward[(rows.shape[0],)](rows, weight, out, rstd, rows.shape[1], eps, BLOCK=block)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.shape = x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        rows, weight, rstd = ctx.saved_tensors
        grad_rows = grad_out.reshape(rows.shape).contiguous()
        grad_x = torch.empty_like(rows)
        grad_w_rows = torch.empty(rows.shape, device=rows.device, dtype=torch.float32)
        block = triton.next_power_of_2(rows.shape[1])
        _rms_norm_backward[(rows.shape[0],)](rows, weight, rstd, grad_rows, grad_x, grad_w_rows, rows.shape[1],
                                             BLOCK=block)  # fmt: skip
        return grad_x.view(ctx.shape), grad_w_rows.sum(0).to(weight.dtype), None


@triton.jit
def _swiglu_forward(GATE, UP, OUT, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    gate = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offsets, (gate * tl.sigmoid(gate) * up).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward(GATE, UP, GRAD_OUT, GRAD_GATE, GRAD_UP, n, BLOCK: tl.constexpr):
    """d gate = dy up sig (1 + gate (1 - sig)); d up = dy gate sig."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    gate = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(GRAD_OUT + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    tl.store(GRAD_GATE + offsets, (dy * up * sig * (1 + gate * (1 - sig))).to(GRAD_GATE.dtype.element_ty), mask=mask)
    tl.store(GRAD_UP + offsets, (dy * gate * sig).to(GRAD_UP.dtype.element_ty), mask=mask)


SWIGLU_BLOCK = 1024


class TritonSwiGLU(torch.autograd.Function):
    """silu(gate) * up, elementwise, saving only gate and up. gate, up: the same shape."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_forward[(triton.cdiv(n, SWIGLU_BLOCK),)](gate, up, out, n, BLOCK=SWIGLU_BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_backward[(triton.cdiv(n, SWIGLU_BLOCK),)](gate, up, grad_out.contiguous(), grad_gate, grad_up, n,
                                                          BLOCK=SWIGLU_BLOCK)  # fmt: skip
        return grad_gate, grad_up


@triton.jit
def _cross_entropy_rows(LOGITS, TARGETS, LOSSES, vocab, stride, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One row: loss = log sum_j exp(z_j - m) + m - z_target with the max m and the sum found in one
    pass over the row (the online softmax); with GRAD, a second pass writes softmax(z) - onehot(target)
    over z, in z's dtype."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    target = tl.load(TARGETS + row)
    top = -float("inf")
    total = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(base + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32)
        new_top = tl.maximum(top, tl.max(z, 0))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(z - new_top), 0)
        top = new_top
    target_logit = tl.load(base + target).to(tl.float32)
    tl.store(LOSSES + row, tl.log(total) + top - target_logit)
    if GRAD:
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(z - top) / total - tl.where(cols == target, 1.0, 0.0)
            tl.store(base + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


CROSS_ENTROPY_BLOCK = 4096


def triton_cross_entropy_rows_(logits: Tensor, targets: Tensor, grad: bool) -> Tensor:
    """Per-row cross-entropy -log softmax(logits)_target, float32 (rows,); with `grad`, `logits` is
    overwritten by softmax(logits) - onehot(target). logits: (rows, vocab), any float dtype, rows
    contiguous; targets: (rows,) integer."""
    if logits.stride(1) != 1:
        raise ValueError("logits: each row must be contiguous")
    rows, vocab = logits.shape
    losses = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows:
        block = min(CROSS_ENTROPY_BLOCK, triton.next_power_of_2(vocab))
        _cross_entropy_rows[(rows,)](logits, targets.contiguous(), losses, vocab, logits.stride(0), GRAD=grad,
                                     BLOCK=block)  # fmt: skip
    return losses
