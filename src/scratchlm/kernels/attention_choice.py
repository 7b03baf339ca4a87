"""The fastest correct causal attention for a shape on CUDA: our Triton FlashAttention-2 or PyTorch's
`F.scaled_dot_product_attention`. Both are timed once per shape (forward, plus backward when
gradients are wanted) with `triton.testing.do_bench`, and the faster serves every later call at that
shape. Without Triton, under `torch.compile` (which cannot trace the timing) and off CUDA, SDPA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _triton(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from scratchlm.kernels.flash_triton import triton_flash_attention

    return triton_flash_attention(q, k, v, True)


CANDIDATES: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {"sdpa": _sdpa, "triton": _triton}
_chosen: dict[tuple, str] = {}
_forced: list[str] = []


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn() on the GPU (`triton.testing.do_bench`: warm-up, flushed L2)."""
    import triton.testing

    return triton.testing.do_bench(fn, return_mode="median")


def choose(q: Tensor, k: Tensor, v: Tensor, timer: Callable[[Callable[[], object]], float] = time_ms) -> str:
    """The name of the faster candidate at this shape, timed on copies of q, k, v (cached)."""
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device, backward)
    if key not in _chosen:
        copies = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
        grad = torch.randn_like(q)

        def run(fn):
            def call():
                out = fn(*copies)
                if backward:
                    torch.autograd.grad(out, copies, grad)

            return call

        times = {name: timer(run(fn)) for name, fn in CANDIDATES.items()}
        _chosen[key] = min(times, key=times.get)
    return _chosen[key]


@contextlib.contextmanager
def forced(name: str) -> Iterator[None]:
    """Use one candidate ("sdpa" or "triton") wherever `causal_attention` applies, e.g. to compare them."""
    if name not in CANDIDATES:
        raise ValueError(f"attention must be one of {sorted(CANDIDATES)}, got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention, q, k, v: (batch, heads, n, d_head) with as many key as query heads -> like q."""
    if _forced:
        return CANDIDATES[_forced[-1]](q, k, v)
    if not q.is_cuda or torch.compiler.is_compiling() or not triton_available():
        return _sdpa(q, k, v)
    return CANDIDATES[choose(q, k, v)](q, k, v)
