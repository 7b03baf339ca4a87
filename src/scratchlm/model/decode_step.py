"""A decoding step of a TransformerLM on the CPU in one C call (`_decode.c`): every block and the LM
head for the new tokens, in place of the ~15 PyTorch operations a layer that the modules run, whose
dispatch cost more than a small model's arithmetic (SmolLM2-135M, 30 layers, batch 1: 25 -> 63 tok/s,
docs/benchmarks.md). The modules remain the definition; this path is checked against them
(tests/test_decode_step.py) and taken only where it computes the same thing:

- one new token per sequence, or, with float32 decoding weights, a few each (a speculative draft
  checked at once, a short prompt, a prefill chunk; bfloat16 and int8 decoding weights serve steps of
  one token, as `set_decode_weights` says): at most 256 tokens a call; without autograd, in evaluation
  mode, float32 weights, on the CPU;
- the standard blocks: pre-norm, SwiGLU, RoPE (or no position embedding), no value embeddings or U-net skips;
- contiguous KV caches (`KVCache`) all at the same length, sequences left-padded to it (as `generate`
  runs a batch and `speculative` checks a draft), or the serving engine's paged caches (each sequence
  at its own length, its keys found through its block table); positions that continue the caches,
  counted from each sequence's first token (0 for the left padding of a prompt).

The weights (the LM head's too) are packed once per format (`kernels.pack_weight`: float32, bfloat16
or int8 per output channel) into a `DecodePlan` kept on the model, a copy of the weights in that
format, rebuilt when a weight changes (its version counter) or the format does. A float32 plan adds
the panel layout (`kernels.panels`, a second copy) the first time a step has `_decode.PANEL_ROWS` rows
or more, which such steps multiply by (outer products, `_matvec.h`); a step of 32 rows a thread or
more is split by sequences over the threads (`_decode.c`).
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
QKV_PANELS, WO_PANELS, W13_PANELS, W2_PANELS = range(12, 16)
PANELS_OF = {QKV: QKV_PANELS, WO: WO_PANELS, W13: W13_PANELS, W2: W2_PANELS}


class DecodePlan:
    """The blocks' weights packed for `_decode.step`, and the table of their addresses, one row a layer."""

    def __init__(self, model, kind: str) -> None:
        # the modules whose `weight` the plan copies: read again at each step to notice a change
        self.owners = [m for m in model.layers.modules() if isinstance(getattr(m, "weight", None), Tensor)]
        self.owners += [model.ln_final, model.lm_head]
        self.kind, self.key = kind, self._key(kind)
        self.keep: list[Tensor] = []  # what the table's addresses point into
        self.table = torch.zeros(len(model.layers), _decode.FIELDS, dtype=torch.int64)
        for i, layer in enumerate(model.layers):
            for column, weight in self._matrices(layer).items():
                packed = kernels.pack_weight(weight, kind)
                self._put(i, column, packed.data)
                if packed.scale is not None:
                    self._put(i, column + 1, packed.scale)  # each matrix's scale column follows it
            self._put(i, LN1, layer.ln1.weight.detach().float().contiguous())
            self._put(i, LN2, layer.ln2.weight.detach().float().contiguous())
        self.ln_final = model.ln_final.weight.detach().float().contiguous()
        self.head = kernels.pack_weight(model.lm_head.weight, kind)
        self.head_panels: Tensor | None = None  # built by `add_panels`, the first time a step has many rows

    @staticmethod
    def _matrices(layer) -> dict[int, Tensor]:
        """A layer's products by their column: q|k|v and w1|w3 stacked, as the step computes them."""
        attn, ffn = layer.attn, layer.ffn
        return {
            QKV: torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
            WO: attn.output_proj.weight,
            W13: torch.cat([ffn.w1.weight, ffn.w3.weight]),
            W2: ffn.w2.weight,
        }

    def add_panels(self, model) -> None:
        """The float32 weights in the panel layout too (`kernels.panels`), which a step of `PANEL_ROWS`
        rows or more multiplies by: a second copy of the weights, made only for such steps."""
        for i, layer in enumerate(model.layers):
            for column, weight in self._matrices(layer).items():
                self._put(i, PANELS_OF[column], kernels.panels(weight))
        self.head_panels = kernels.panels(model.lm_head.weight)

    def _put(self, layer: int, column: int, tensor: Tensor) -> None:
        self.keep.append(tensor)
        self.table[layer, column] = tensor.data_ptr()

    def _key(self, kind: str) -> tuple:
        return kind, tuple((m.weight._version, m.weight.data_ptr()) for m in self.owners)

    def matches(self, kind: str) -> bool:
        """Whether the plan still holds the model's weights (none changed in place or replaced) in `kind`."""
        return self._key(kind) == self.key


def decode_kind(model) -> str:
    """The format `set_decode_weights` chose: float32 unless it was set."""
    return getattr(model.layers[0].attn, "decode_weights", "float32") if len(model.layers) else "float32"


def _layout(caches, seqs: int, n_new: int, key_mask: Tensor | None) -> dict | None:
    """Where the caches keep keys and values, as `_decode.step` reads them, or None if it cannot: the
    contiguous `KVCache`s of `generate` (all at one length, sequences left-padded to it: `key_mask`
    False on each one's first positions), or the serving engine's paged ones (a block pool and block
    tables; each sequence at its own length, its key_mask only hiding the gaps that gathering leaves)."""
    first = caches[0]
    if getattr(first, "paged", False):
        if not all(getattr(c, "paged", False) and c.tables is first.tables for c in caches):
            return None
        k = [c.pool.k[c.layer] for c in caches]
        v = [c.pool.v[c.layer] for c in caches]
        tables = first.tables.contiguous()
        if tables.shape[0] != seqs:
            return None
        past = (first.lengths - n_new).contiguous()
        return {"k": k, "v": v, "past": past, "start": torch.zeros_like(past), "max_len": 0, "tables": tables,
                "block_size": first.pool.block_size}  # fmt: skip
    if not all(type(c) is KVCache and c.length == first.length for c in caches):
        return None
    if first.length + n_new > first.k.shape[2] or first.k.shape[0] != seqs:  # full: the modules say so
        return None
    past = torch.full((seqs,), first.length, dtype=torch.int64)
    start = torch.zeros(seqs, dtype=torch.int64)
    if key_mask is not None:  # left padding only: False, then True to the end
        if key_mask.shape != (seqs, first.length + n_new) or key_mask.device.type != "cpu":
            return None
        start = (~key_mask).sum(1)
        if not bool((key_mask == (torch.arange(key_mask.shape[1]) >= start[:, None])).all()):
            return None
    return {"k": [c.k for c in caches], "v": [c.v for c in caches], "past": past, "start": start,
            "max_len": first.k.shape[2], "tables": None, "block_size": 0}  # fmt: skip


def applies(model, token_ids: Tensor, positions: Tensor | None, caches, key_mask: Tensor | None) -> dict | None:
    """Where the caches keep keys and values if `step` computes this step (see the module's docstring for
    what it takes), else None."""
    c = model.config
    if (
        _decode is None
        or token_ids.dim() != 2
        or not 1 <= token_ids.numel() <= _decode.MAX_ROWS
        or token_ids.device.type != "cpu"
        or torch.is_grad_enabled()
        or model.training
        or c.norm_position != "pre"
        or c.ffn != "swiglu"
        or c.value_embeddings
        or c.unet_skips
        or model.lm_head.weight.dtype != torch.float32
        or not caches
        or len(caches) != len(model.layers)
    ):
        return None
    seqs, n_new = token_ids.shape
    if n_new > 1 and decode_kind(model) != "float32":  # quantized weights serve steps of one token only
        return None
    layout = _layout(caches, seqs, n_new, key_mask)
    if layout is None:
        return None
    if any(k.dtype != torch.float32 or not k.is_contiguous() for k in layout["k"] + layout["v"]):
        return None
    if int(layout["past"].max()) + n_new > c.context_length:  # the modules say so
        return None
    # positions count from each sequence's first real token; a padding token's (left of it) is 0
    expected = (layout["past"][:, None] + torch.arange(n_new) - layout["start"][:, None]).clamp(min=0)
    if positions is not None and (positions.shape[-1] != n_new or not bool((positions == expected).all())):
        return None
    return layout


def step(model, token_ids: Tensor, caches, layout: dict) -> Tensor:
    """The logits (batch, n_new, vocab) after the new tokens of each sequence, which the caches gain.
    token_ids: (batch, n_new); layout: what `applies` returned."""
    c = model.config
    kind = decode_kind(model)
    plan = getattr(model, "_decode_plan", None)
    if plan is None or not plan.matches(kind):
        plan = model._decode_plan = DecodePlan(model, kind)
    seqs, n_new = token_ids.shape
    if kind == "float32" and 0 < _decode.PANEL_ROWS <= seqs * n_new and plan.head_panels is None:
        plan.add_panels(model)
    table = plan.table.clone()
    for i, (k, v) in enumerate(zip(layout["k"], layout["v"], strict=True)):
        table[i, K_CACHE], table[i, V_CACHE] = k.data_ptr(), v.data_ptr()
    x = model.token_embeddings(token_ids.reshape(-1)).float().contiguous()  # (rows, d_model), updated in place
    logits = x.new_empty(x.shape[0], c.vocab_size)
    rope = model.layers[0].attn.rope if len(model.layers) else None
    rotations = rope.rotations.float().contiguous() if rope is not None else None
    tables = layout["tables"]
    _decode.step(
        x.data_ptr(), table.data_ptr(), len(model.layers), seqs, n_new, c.d_model, c.n_heads, c.n_kv_heads,
        c.d_head, c.d_ff, layout["past"].data_ptr(), layout["start"].data_ptr(), layout["max_len"],
        0 if tables is None else tables.data_ptr(),
        0 if tables is None else tables.shape[1], layout["block_size"],
        0 if rotations is None else rotations.data_ptr(), c.norm_eps, kernels.PACKED_KINDS[kind],
        plan.ln_final.data_ptr(), plan.head.data.data_ptr(),
        0 if plan.head.scale is None else plan.head.scale.data_ptr(),
        0 if plan.head_panels is None else plan.head_panels.data_ptr(), c.vocab_size, logits.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if tables is None:
        for cache in caches:
            cache.length += n_new
    return logits.view(seqs, n_new, -1)
