"""FP8 training matmuls: the blocks' projections y = x W^T in float8 with dynamic scales, as
torchao's float8 training does, through `torch._scaled_mm` (tensor cores on H100 / H200 class GPUs, at
twice bf16's peak; PyTorch's own CPU implementation elsewhere, which the tests use).

Each operand is cast to float8 with a scale s = amax / (float8's largest value), so that t ~ s t8:
- "tensorwise": one scale per tensor; x and W in e4m3 (3 mantissa bits), the gradient in e5m2 (more
  range, for gradients' wider spread).
- "rowwise": one scale per row of the left operand and per column of the right one (per token of x,
  per output channel of W), all in e4m3; finer scales, a little slower.

Forward y = x W^T; backward dx = dy W and dW = dy^T x, each an fp8 matmul with its operands scaled
along the dimension it keeps. The LM head stays in the run's precision (its logits feed a softmax over
the whole vocabulary), as do shapes `_scaled_mm` does not take (a dimension not a multiple of 16).
Applied to a built model by `convert_to_fp8`: each projection's owner gets an `fp8` recipe, which
`layers.project` reads; the modules and the loop know nothing else of it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
RECIPES = ("tensorwise", "rowwise")


def quantize(t: Tensor, dtype: torch.dtype, dim: int | None) -> tuple[Tensor, Tensor]:
    """t ~ scale * t8: t8 in the float8 `dtype`, scale = amax |t| / its largest value, float32, over the
    whole tensor (dim None: a 0-d scale) or along `dim` (kept, so the scale broadcasts)."""
    amax = t.detach().abs().amax() if dim is None else t.detach().abs().amax(dim=dim, keepdim=True)
    top = torch.finfo(dtype).max
    scale = amax.float().clamp(min=1e-12) / top
    return (t.float() / scale).clamp(-top, top).to(dtype), scale


def scaled_matmul(a: Tensor, b: Tensor, rowwise: bool, a_dtype: torch.dtype, b_dtype: torch.dtype,
                  out_dtype: torch.dtype) -> Tensor:  # fmt: skip
    """a @ b in float8: a (m, k) scaled per row (or whole), b (k, n) per column (or whole); -> (m, n)."""
    a8, scale_a = quantize(a, a_dtype, 1 if rowwise else None)
    b8, scale_b = quantize(b, b_dtype, 0 if rowwise else None)
    # _scaled_mm takes a row-major and b column-major; rowwise scaling wants a bf16 output
    mm_dtype = torch.bfloat16 if rowwise else out_dtype
    out = torch._scaled_mm(a8.contiguous(), b8.t().contiguous().t(), scale_a=scale_a, scale_b=scale_b,
                           out_dtype=mm_dtype)  # fmt: skip
    return out.to(out_dtype)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, rowwise: bool, out_dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.rowwise = rowwise
        return scaled_matmul(x, weight.t(), rowwise, E4M3, E4M3, out_dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        grad_dtype = E4M3 if ctx.rowwise else E5M2
        grad_x = scaled_matmul(grad_out, weight, ctx.rowwise, grad_dtype, E4M3, x.dtype)
        grad_weight = scaled_matmul(grad_out.t(), x, ctx.rowwise, grad_dtype, E4M3, weight.dtype)
        return grad_x, grad_weight, None, None


def takes(x: Tensor, weight: Tensor) -> bool:
    """Whether `_scaled_mm` takes this product: every dimension (tokens, d_in, d_out) a multiple of 16."""
    return x.numel() > 0 and all(n % 16 == 0 for n in (x.numel() // x.shape[-1], *weight.shape))


def fp8_linear(x: Tensor, weight: Tensor, recipe: str) -> Tensor:
    """x (..., d_in) times weight (d_out, d_in)^T in float8 -> (..., d_out), in autocast's dtype when it
    is on (else x's); F.linear where `_scaled_mm` does not take the shape."""
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    if not takes(x, weight):
        return torch.nn.functional.linear(x, weight)
    rows = x.reshape(-1, x.shape[-1])
    return _FP8Linear.apply(rows, weight, recipe == "rowwise", out_dtype).view(*x.shape[:-1], weight.shape[0])


def check_device(device: torch.device) -> None:
    """FP8 tensor cores need compute capability 8.9 (Ada, Hopper and later); the CPU runs it in software."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"fp8 needs a GPU of compute capability 8.9 or later (H100, L4, ...); {name} is not one")


def convert_to_fp8(model: nn.Module, recipe: str) -> int:
    """Have `model`'s projections (attention, feed-forward) multiply in float8 with `recipe`; the LM head
    and the embeddings keep their precision. Returns the number of projections converted."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8: expected one of {', '.join(RECIPES)}, got {recipe!r}")
    head = getattr(model, "lm_head", None)
    converted = 0
    for module in model.modules():
        if hasattr(module, "_decode") and module is not head:  # the modules that multiply through `project`
            module.fp8 = recipe
            converted += 1
    return converted
