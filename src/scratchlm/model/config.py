"""The shape and the options of a TransformerLM, checked when made; no torch needed to read one.

Named shapes (`MODEL_PRESETS`) are GPT-2's sizes with this architecture, for the accounting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from scratchlm.checks import ConfigError, above, at_least, between, check_fields


def default_d_ff(d_model: int) -> int:
    """About 8/3 d_model, rounded to a multiple of 64 (keeps SwiGLU's parameters near a 4x MLP's)."""
    return max(64, round(8 * d_model / 3 / 64) * 64)


def checkpoint_interval(value: str) -> int:
    """`activation_checkpointing` as K, one block in K checkpointed: "none" 0, "blocks" 1, "every:K" K."""
    if value == "none":
        return 0
    if value == "blocks":
        return 1
    k = value.removeprefix("every:")
    if value.startswith("every:") and k.isdigit() and int(k) >= 1:
        return int(k)
    raise ConfigError("activation_checkpointing", f'expected "none", "blocks" or "every:K" with K >= 1, got {value!r}')


@dataclass
class ModelConfig:
    """The shape and the options of a TransformerLM."""

    vocab_size: int = field(default=10_000, metadata=at_least(1))
    context_length: int = field(default=256, metadata=at_least(1))
    d_model: int = field(default=512, metadata=at_least(1))
    n_layers: int = field(default=4, metadata=at_least(0))
    n_heads: int = field(default=16, metadata=at_least(1))
    n_kv_heads: int | None = field(default=None, metadata=at_least(1))  # grouped-query attention when < n_heads
    d_ff: int | None = field(default=None, metadata=at_least(1))  # default: about 8/3 d_model, a multiple of 64
    rope_theta: float = field(default=10_000.0, metadata=above(0))
    norm_eps: float = field(default=1e-5, metadata=above(0))  # RMSNorm's epsilon
    tie_embeddings: bool = False
    norm_position: Literal["pre", "post"] = "pre"
    position_embedding: Literal["rope", "none"] = "rope"
    ffn: Literal["swiglu", "silu", "relu2"] = "swiglu"  # gated SiLU, or W2 act(W1 x) with SiLU or ReLU^2
    # The nanoGPT speedrun's additions (not in the Llama architecture, so such a model does not export):
    # value_embeddings, a table per block whose row for each token is added to its values (zero at init);
    # unet_skips, block i's output added, times a learned weight (1 at init), to the input of block
    # n_layers - 1 - i, for i < n_layers // 2.
    value_embeddings: bool = False
    unet_skips: bool = False
    fused_kernels: bool = True  # F.scaled_dot_product_attention and F.rms_norm where they exist
    # While training: on the embeddings, each residual branch and the attention weights.
    dropout: float = field(default=0.0, metadata=between(0, 1, high_open=True))
    # Recompute blocks in backward instead of keeping their activations: "none", "blocks" (every block) or
    # "every:K" (blocks 0, K, 2K, ...): saved memory falls to the block inputs for the checkpointed blocks.
    activation_checkpointing: str = "none"

    def __post_init__(self) -> None:
        check_fields(self)
        if self.d_ff is None:
            self.d_ff = default_d_ff(self.d_model)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_model % self.n_heads:
            raise ConfigError(
                ("n_heads", "d_model"), f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        checkpoint_interval(self.activation_checkpointing)  # a bad value fails when the config is made
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                "n_kv_heads", f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.position_embedding == "rope" and self.d_head % 2:
            raise ConfigError(
                ("n_heads", "d_model"),
                f"RoPE needs an even head dimension, and d_model / n_heads = {self.d_model} / {self.n_heads} = "
                f"{self.d_head}",
            )

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def checkpoint_every(self) -> int:
        """K when one block in K is checkpointed (1: every block), 0 for none."""
        return checkpoint_interval(self.activation_checkpointing)

    def is_checkpointed(self, layer: int) -> bool:
        """Whether block `layer` is recomputed in backward."""
        every = self.checkpoint_every
        return bool(every) and layer % every == 0

    @property
    def checkpointed_layers(self) -> int:
        return sum(self.is_checkpointed(i) for i in range(self.n_layers))


MODEL_PRESETS = {
    # GPT-2 shapes with this architecture (SwiGLU, RoPE, RMSNorm, untied head), GPT-2's vocabulary.
    "gpt2-small": ModelConfig(vocab_size=50257, context_length=1024, d_model=768, n_layers=12, n_heads=12),
    "gpt2-medium": ModelConfig(vocab_size=50257, context_length=1024, d_model=1024, n_layers=24, n_heads=16),
    "gpt2-large": ModelConfig(vocab_size=50257, context_length=1024, d_model=1280, n_layers=36, n_heads=20),
    "gpt2-xl": ModelConfig(vocab_size=50257, context_length=1024, d_model=1600, n_layers=48, n_heads=25),
}
