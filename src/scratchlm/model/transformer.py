"""TransformerLM: token embeddings, N pre-norm blocks (attention, then feed-forward), a final RMSNorm
and the LM head. State-dict names read like the architecture: `token_embeddings.weight`,
`layers.0.attn.q_proj.weight`, `layers.0.ffn.w1.weight`, `ln_final.weight`, `lm_head.weight`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scratchlm.model import decode_step
from scratchlm.model.config import ModelConfig
from scratchlm.model.head import lm_head_cross_entropy
from scratchlm.model.layers import (
    CausalSelfAttention,
    Dropout,
    Embedding,
    KVCache,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    UngatedFFN,
)
from scratchlm.train.loss import cross_entropy


class TransformerBlock(nn.Module):
    """Pre-norm: x + attn(norm(x)), then + ffn(norm(.)). Post-norm: norm(x + attn(x)), norm(. + ffn(.))."""

    def __init__(
        self, config: ModelConfig, rope: RotaryEmbedding | None, device=None, dtype=None, checkpointed: bool = False
    ) -> None:
        super().__init__()
        self.checkpointed = checkpointed  # recomputed in backward (non-reentrant torch.utils.checkpoint)
        fused = config.fused_kernels
        self.pre_norm = config.norm_position == "pre"
        self.ln1 = RMSNorm(config.d_model, config.norm_eps, fused, device, dtype)
        self.attn = CausalSelfAttention(
            config.d_model, config.n_heads, config.n_kv_heads, rope, fused, config.dropout, device, dtype
        )
        self.ln2 = RMSNorm(config.d_model, config.norm_eps, fused, device, dtype)
        if config.ffn == "swiglu":
            self.ffn = SwiGLU(config.d_model, config.d_ff, fused, device, dtype)
        else:
            self.ffn = UngatedFFN(config.d_model, config.d_ff, fused, device, dtype, activation=config.ffn)
        self.dropout = Dropout(config.dropout, fused)  # on each branch's output, before it joins the residual

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        key_mask: Tensor | None = None,
        value_embedding: Tensor | None = None,
    ) -> Tensor:
        """x: (batch, seq, d_model) -> (batch, seq, d_model); value_embedding: see CausalSelfAttention."""
        if self.checkpointed and cache is None and torch.is_grad_enabled():
            return checkpoint(self._forward, x, positions, None, key_mask, value_embedding, use_reentrant=False)
        return self._forward(x, positions, cache, key_mask, value_embedding)

    def _forward(
        self,
        x: Tensor,
        positions: Tensor | None,
        cache: KVCache | None,
        key_mask: Tensor | None,
        value_embedding: Tensor | None,
    ) -> Tensor:
        if self.pre_norm:
            x = x + self.dropout(self.attn(self.ln1(x), positions, cache, key_mask, value_embedding))
            return x + self.dropout(self.ffn(self.ln2(x)))
        x = self.ln1(x + self.dropout(self.attn(x, positions, cache, key_mask, value_embedding)))
        return self.ln2(x + self.dropout(self.ffn(x)))


class TransformerLM(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        self.token_embeddings = Embedding(config.vocab_size, config.d_model, device, dtype)
        self.embedding_dropout = Dropout(config.dropout, config.fused_kernels)
        rope = None
        if config.position_embedding == "rope":
            rope = RotaryEmbedding(config.d_head, config.context_length, config.rope_theta, device)
        self.layers = nn.ModuleList(
            TransformerBlock(config, rope, device, dtype, config.is_checkpointed(i)) for i in range(config.n_layers)
        )
        self.value_embeddings = None
        if config.value_embeddings:
            kv_dim = config.n_kv_heads * config.d_head
            self.value_embeddings = nn.ModuleList(
                Embedding(config.vocab_size, kv_dim, device, dtype) for _ in range(config.n_layers)
            )
            for table in self.value_embeddings:
                nn.init.zeros_(table.weight)
        self.skip_weights = None
        if config.unet_skips:
            self.skip_weights = nn.Parameter(torch.ones(config.n_layers // 2, device=device, dtype=dtype))
        self.ln_final = RMSNorm(config.d_model, config.norm_eps, config.fused_kernels, device, dtype)
        self.lm_head = Linear(config.d_model, config.vocab_size, device, dtype)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embeddings.weight

    def hidden_states(
        self,
        token_ids: Tensor,
        positions: Tensor | None = None,
        caches: list[KVCache] | None = None,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """token_ids: (batch, seq) -> final normed states (batch, seq, d_model).

        With `caches` (one per layer, from `new_caches`), token_ids are the next tokens after those
        cached; positions then default to continue from the cache. key_mask: (batch, cached + seq) bool,
        False for padding. Cached plus new tokens must fit in the context length.
        """
        past = caches[0].length if caches else 0
        length, limit = past + token_ids.shape[-1], self.config.context_length
        if length > limit:
            raise ValueError(f"sequence of {length} tokens exceeds the context length {limit}")
        if positions is None and past:
            positions = torch.arange(past, past + token_ids.shape[-1], device=token_ids.device)
        x = self.embedding_dropout(self.token_embeddings(token_ids))
        n = len(self.layers)
        skipped = n // 2 if self.skip_weights is not None else 0
        outputs = []  # of the first `skipped` blocks, for the U-net skips
        for i, layer in enumerate(self.layers):
            if i >= n - skipped:
                x = x + self.skip_weights[n - 1 - i] * outputs[n - 1 - i]
            ve = self.value_embeddings[i](token_ids) if self.value_embeddings is not None else None
            x = layer(x, positions, caches[i] if caches else None, key_mask, ve)
            if i < skipped:
                outputs.append(x)
        return self.ln_final(x)

    def forward(
        self,
        token_ids: Tensor,
        positions: Tensor | None = None,
        caches: list[KVCache] | None = None,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """token_ids: (batch, seq) -> logits (batch, seq, vocab_size). See `hidden_states` for the rest.
        A decoding step on the CPU runs in one C call where it can (`decode_step`)."""
        if caches and (layout := decode_step.applies(self, token_ids, positions, caches, key_mask)):
            return decode_step.step(self, token_ids, caches, layout)
        return self.lm_head(self.hidden_states(token_ids, positions, caches, key_mask))

    def new_caches(self, batch: int, device=None, dtype=None, max_len: int | None = None) -> list[KVCache]:
        """Empty KV caches, one per layer, each holding up to `max_len` positions (default: the context
        length; a long-context model's full context is gigabytes a sequence, so size it to the need)."""
        c = self.config
        device = device or self.lm_head.weight.device
        dtype = dtype or self.lm_head.weight.dtype
        length = min(max_len or c.context_length, c.context_length)
        return [KVCache.empty(batch, c.n_kv_heads, length, c.d_head, device, dtype) for _ in self.layers]

    def loss(self, token_ids: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats). token_ids, targets: (batch, seq).

        With fused kernels the LM head and the loss run together in chunks of rows
        (`lm_head_cross_entropy`), so the (batch x seq x vocab) logits never exist at once; not when
        torch.compile traces the model under autocast (it fuses the plain expression its own way).
        """
        hidden = self.hidden_states(token_ids)
        autocast = torch.is_autocast_enabled(hidden.device.type)
        if self.config.fused_kernels and not (autocast and torch.compiler.is_compiling()):
            return lm_head_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten())
        return cross_entropy(self.lm_head(hidden), targets)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights count once
