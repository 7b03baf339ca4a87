"""The named model sizes `scratchlm bench` takes, each with the batch it runs by default.

The course's (CS336 assignment 2: vocabulary 10,000, batch 4, context 512), and CPU-sized ones (the
throughput benchmark's tiny and small shapes), the defaults on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from scratchlm.model.config import ModelConfig


@dataclass(frozen=True)
class Size:
    d_model: int
    d_ff: int
    n_layers: int
    n_heads: int
    batch: int = 4
    context: int = 512
    vocab_size: int = 10_000

    def model(self, context: int | None = None, **options) -> ModelConfig:
        """The model at this size, for sequences of `context` tokens (default: the size's)."""
        return ModelConfig(
            vocab_size=self.vocab_size, context_length=context or self.context, d_model=self.d_model,
            n_layers=self.n_layers, n_heads=self.n_heads, d_ff=self.d_ff, **options,
        )  # fmt: skip


SIZES = {
    "cpu-tiny": Size(128, 384, 4, 4, batch=16, context=128),
    "cpu-small": Size(512, 1344, 4, 16, batch=8, context=256),
    "small": Size(768, 3072, 12, 12),
    "medium": Size(1024, 4096, 24, 16),
    "large": Size(1280, 5120, 36, 20),
    "xl": Size(1600, 6400, 48, 25),
    "2.7B": Size(2560, 10240, 32, 32),
}
CPU_DEFAULTS = ("cpu-tiny", "cpu-small")
MODES = ("forward", "forward-backward", "step")
DTYPE_NAMES = ("fp32", "bf16", "fp16")  # fp32, or autocast to a half dtype
GPU_DEFAULTS = ("small", "medium", "large")
