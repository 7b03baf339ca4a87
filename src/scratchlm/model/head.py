"""The LM head and the cross-entropy loss, fused and chunked.

Computing logits = h W^T for every position, then the loss, then the gradient, reads and writes a
(positions x vocab) float32 array several times: 82 MB for 2048 positions and 10k tokens. This computes
the loss and both gradients a block of rows at a time, the trick of Liger Kernel's fused linear
cross-entropy: the same matmuls, one pass over each block's logits (`kernels.cross_entropy_rows_`),
and the memory of a block instead of the whole. The gradients are formed in the forward pass (where the
block is at hand) and scaled by the incoming gradient in backward.

d loss / d logits = (softmax(logits) - onehot(target)) / N for the mean over N positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scratchlm.model.kernels import cross_entropy_rows_, rows_kernel_takes

# Rows per block: as many as 64 MiB of float32 logits hold, in blocks of equal size. Thicker blocks keep
# the matmuls (rows x d_model x vocab) nearer peak; with the single-pass loss kernel and freed memory
# reused (`keep_freed_memory`), thin ones no longer win anything back. Measured on 2-core EPYC, fwd + bwd,
# 2048 rows, vocab 10k: d_model 512: 104 rows 444 ms, 419 rows 380 ms, 1024 rows 360 ms, 2048 rows 353 ms;
# d_model 128: 119, 110, 104, 104 ms. On CUDA the blocks are larger (GPU_BLOCK_BYTES), so that each
# block's matmuls fill the GPU: 16k positions of a 50k vocabulary in 4 blocks instead of 3.3 GB of
# float32 logits at once (a choice not yet measured on a GPU).
BLOCK_BYTES = 64 << 20
GPU_BLOCK_BYTES = 512 << 20
MIN_ROWS = 64


def block_rows(n: int, vocab: int, block_bytes: int | None = None) -> int:
    """Rows per block for n positions: equal blocks of at most block_bytes (default BLOCK_BYTES) of
    float32 logits, at least MIN_ROWS rows."""
    block_bytes = block_bytes or BLOCK_BYTES
    blocks = -(-n // max(MIN_ROWS, block_bytes // (4 * vocab)))
    return max(1, -(-n // max(blocks, 1)))


def _into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out = a @ b, in place where the dtypes agree."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _blocked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, need_grad: bool, dtype: torch.dtype):
    """(mean loss, N x its gradient for hidden, N x its gradient for weight) — the gradients None
    without `need_grad`. The matmuls run in `dtype` (autocast's, when it is on), the loss in float32, and
    the weight's gradient sums in the weight's own dtype (float32 master weights)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = block_rows(n, vocab, GPU_BLOCK_BYTES if hidden.is_cuda else None)
    grad_hidden = torch.empty_like(hidden) if need_grad else None
    grad_weight = torch.empty_like(weight) if need_grad else None
    sum_dtype = torch.float32 if hidden.device.type == "mps" else torch.float64  # MPS has no float64
    total = torch.zeros((), dtype=sum_dtype, device=hidden.device)
    w = weight.to(dtype)
    for start in range(0, n, rows):
        h, t = hidden[start : start + rows].to(dtype), targets[start : start + rows]
        logits = h @ w.mT  # (rows, vocab)
        if not rows_kernel_takes(logits):
            logits = logits.float()
        # One pass over the block (a C kernel on CPU, Triton on CUDA): the rows' losses and, for the
        # gradients, the logits overwritten by N x d loss / d logits = softmax - onehot (1/N in backward).
        total += cross_entropy_rows_(logits, t, grad=need_grad).sum(dtype=sum_dtype)
        if need_grad:
            grad_logits = logits.to(dtype)
            _into(grad_hidden[start : start + rows], grad_logits, w)
            if grad_weight.dtype != dtype:
                part = grad_logits.mT @ h
                grad_weight.copy_(part) if start == 0 else grad_weight.add_(part)
            elif start == 0:
                torch.mm(grad_logits.mT, h, out=grad_weight)
            else:
                grad_weight.addmm_(grad_logits.mT, h)
    return (total / n).to(torch.promote_types(hidden.dtype, torch.float32)), grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grad_hidden, grad_weight = _blocked_cross_entropy(hidden, weight, targets, True, dtype)
        ctx.n = hidden.shape[0]
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        # The 1/N of the mean and the incoming gradient in one in-place pass: no new 20 MB array. (A second
        # backward through the same graph then fails autograd's version check instead of going wrong.)
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output / ctx.n
        return grad_hidden.mul_(scale), grad_weight.mul_(scale), None, None


def lm_head_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """mean_i CE(hidden_i W^T, target_i). hidden: (N, d_model), weight: (vocab, d_model), targets: (N,).
    Under autocast the matmuls run in its dtype (bf16 / fp16), as `F.linear` would; the loss and the
    weight's gradient stay float32. Without autograd (evaluation) only the loss is computed: a third of
    the work."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, dtype)
    with torch.autocast(device, enabled=False):
        return _blocked_cross_entropy(hidden, weight, targets, False, dtype)[0]
