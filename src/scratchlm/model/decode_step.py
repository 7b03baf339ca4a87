"""A decoding step of a TransformerLM on the CPU in one C call (`_decode.c`): every block and the LM
head for the new token of each sequence, in place of the ~15 PyTorch operations a layer that the modules run, whose
dispatch costs more than a small model's arithmetic (SmolLM2-135M, 30 layers: 40 -> see
docs/benchmarks.md). The modules remain the definition; this path is checked against them
(tests/test_decode_step.py) and taken only where it computes the same thing:

- a step of one new token per sequence (1 to 16 sequences), or, with float32 decoding weights, a few
  for each (a speculative draft checked at once, a short prompt; bfloat16 and int8 decoding weights
  serve steps of one token, as `set_decode_weights` says): at most 16 in all; without autograd, in
  evaluation mode, float32 weights on the CPU;
- the standard blocks: pre-norm, SwiGLU, RoPE (or no position embedding);
- contiguous KV caches (`KVCache`) all at the same length, no padding mask, positions that continue
  the cache (as `generate` runs an unpadded batch and `speculative` checks a draft).

The weights (the LM head's too) are packed once per format (`set_decode_weights`: float32, bfloat16 or int8 per output
channel) into a `DecodePlan` kept on the model, rebuilt when a weight changes (its version counter) or
the format does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scratchlm.model import kernels
from scratchlm.model.layers import KVCache

try:
    from scratchlm.model import _decode
except ImportError:
    _decode = None

# the columns of a layer's row in the plan's table (the enum of _decode.c)
LN1, QKV, QKV_SCALE, WO, WO_SCALE, LN2, W13, W13_SCALE, W2, W2_SCALE, K_CACHE, V_CACHE = range(12)


class DecodePlan:
    """The blocks' weights packed for `_decode.step`, and the table of their addresses, one row a layer."""

    def __init__(self, model, kind: str) -> None:
        self.kind, self.key = kind, self._key(model, kind)
        self.keep: list[Tensor] = []  # what the table's addresses point into
        self.table = torch.zeros(len(model.layers), _decode.FIELDS, dtype=torch.int64)
        for i, layer in enumerate(model.layers):
            attn, ffn = layer.attn, layer.ffn
            matrices = {
                QKV: torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                WO: attn.output_proj.weight,
                W13: torch.cat([ffn.w1.weight, ffn.w3.weight]),
                W2: ffn.w2.weight,
            }
            for column, weight in matrices.items():
                packed = kernels.pack_weight(weight, kind)
                self._put(i, column, packed.data)
                if packed.scale is not None:
                    self._put(i, column + 1, packed.scale)  # each matrix's scale column follows it
            self._put(i, LN1, layer.ln1.weight.detach().float().contiguous())
            self._put(i, LN2, layer.ln2.weight.detach().float().contiguous())
        self.ln_final = model.ln_final.weight.detach().float().contiguous()
        self.head = kernels.pack_weight(model.lm_head.weight, kind)

    def _put(self, layer: int, column: int, tensor: Tensor) -> None:
        self.keep.append(tensor)
        self.table[layer, column] = tensor.data_ptr()

    @staticmethod
    def _key(model, kind: str) -> tuple:
        weights = [*model.layers.parameters(), model.ln_final.weight, model.lm_head.weight]
        return kind, tuple((p._version, p.data_ptr()) for p in weights)

    def matches(self, model, kind: str) -> bool:
        return self._key(model, kind) == self.key


def decode_kind(model) -> str:
    """The format `set_decode_weights` chose: float32 unless it was set."""
    return getattr(model.layers[0].attn, "decode_weights", "float32") if len(model.layers) else "float32"


def applies(model, token_ids: Tensor, positions: Tensor | None, caches, key_mask: Tensor | None) -> bool:
    """Whether `step` computes this step (see the module's docstring for what it takes)."""
    c = model.config
    if (
        _decode is None
        or key_mask is not None
        or token_ids.dim() != 2
        or not 1 <= token_ids.numel() <= _decode.MAX_ROWS
        or token_ids.device.type != "cpu"
        or torch.is_grad_enabled()
        or model.training
        or c.norm_position != "pre"
        or c.ffn != "swiglu"
        or model.lm_head.weight.dtype != torch.float32
        or not caches
    ):
        return False
    past, n_new = caches[0].length, token_ids.shape[1]
    if past + n_new > c.context_length:  # the modules say so
        return False
    if n_new > 1 and decode_kind(model) != "float32":  # quantized weights serve steps of one token only
        return False
    for cache in caches:
        if type(cache) is not KVCache or cache.length != past or cache.k.dtype != torch.float32:
            return False
        if past + n_new > cache.k.shape[2]:  # full: the modules' path says so
            return False
        if not (cache.k.is_contiguous() and cache.v.is_contiguous()) or cache.k.shape[0] != token_ids.shape[0]:
            return False
    if positions is None:
        return True
    expected = torch.arange(past, past + n_new, device=positions.device)
    return positions.shape[-1] == n_new and bool((positions == expected).all())


def step(model, token_ids: Tensor, caches: list[KVCache]) -> Tensor:
    """The logits (batch, n_new, vocab) after the new tokens of each sequence; each cache gains them.
    token_ids: (batch, n_new). Check `applies` first."""
    c = model.config
    kind = decode_kind(model)
    plan = getattr(model, "_decode_plan", None)
    if plan is None or not plan.matches(model, kind):
        plan = model._decode_plan = DecodePlan(model, kind)
    table = plan.table.clone()
    for i, cache in enumerate(caches):
        table[i, K_CACHE], table[i, V_CACHE] = cache.k.data_ptr(), cache.v.data_ptr()
    seqs, n_new = token_ids.shape
    x = model.token_embeddings(token_ids.reshape(-1)).float().contiguous()  # (rows, d_model), updated in place
    logits = x.new_empty(x.shape[0], c.vocab_size)
    past = caches[0].length
    rope = model.layers[0].attn.rope if len(model.layers) else None
    rotations = rope.rotations.float().contiguous() if rope is not None else None
    max_len = caches[0].k.shape[2]
    _decode.step(
        x.data_ptr(), table.data_ptr(), len(model.layers), seqs, n_new, c.d_model, c.n_heads, c.n_kv_heads,
        c.d_head, c.d_ff, max_len, past, 0 if rotations is None else rotations.data_ptr(), c.norm_eps,
        kernels.PACKED_KINDS[kind], plan.ln_final.data_ptr(), plan.head.data.data_ptr(),
        0 if plan.head.scale is None else plan.head.scale.data_ptr(), c.vocab_size, logits.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    for cache in caches:
        cache.length = past + n_new
    return logits.view(seqs, n_new, -1)
