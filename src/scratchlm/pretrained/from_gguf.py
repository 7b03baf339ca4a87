"""Read a GGUF file (llama.cpp's format) into a `TransformerLM` and a `Tokenizer`: the reverse of
`scratchlm.infer.gguf_export`.

The `llama` architecture maps one to one onto ours (pre-norm RMSNorm, RoPE, SwiGLU, grouped-query
attention, tied or untied head), and llama.cpp's RoPE rotates adjacent pairs as ours does, so the weights
need no reordering. Every tensor is dequantised to float32 by the `gguf` package (F32, F16, BF16, Q8_0,
Q4_0, Q4_1 and the other types it reads); a quantised file imports as the float model its blocks decode
to, which is what llama.cpp computes with too.

The tokenizer comes from the file's own fields: `tokenizer.ggml.tokens` (GPT-2's printable byte
strings), `merges`, `token_type` (CONTROL and USER_DEFINED tokens are special: never split), the
pre-tokenizer named by `tokenizer.ggml.pre`, the end token `eos_token_id` and `tokenizer.chat_template`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from scratchlm.errors import ScratchLMError
from scratchlm.infer.gguf_export import INSTALL, gguf_names
from scratchlm.model.config import ModelConfig
from scratchlm.tokenizer import formats
from scratchlm.tokenizer.bpe import Tokenizer

# llama.cpp's names for the pre-tokenizers we have: "gpt2" is GPT-2's pattern; the others split every
# digit off first and then apply GPT-2's pattern (llama.cpp's `\p{N}` + GPT-2 regex list).
GGUF_PRETOKENIZERS = {
    "gpt2": "gpt2",
    "gpt-2": "gpt2",
    "default": "gpt2",
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "codeshell": "digits",
}


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise ScratchLMError(f"reading GGUF files needs the gguf package: {INSTALL}") from None
    if not path.is_file():
        raise ScratchLMError(f"{path}: no such GGUF file")
    try:
        return gguf, gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as exc:
        raise ScratchLMError(f"{path}: not a readable GGUF file ({exc})") from None


def _field(reader, path: Path, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ScratchLMError(f"{path}: the GGUF metadata lacks {key!r}")
        return default
    return field.contents()


def model_config(reader, path: Path) -> ModelConfig:
    """Our ModelConfig from the `llama.*` metadata (and whether the file has an `output` tensor)."""
    architecture = _field(reader, path, "general.architecture")
    if architecture != "llama":
        raise ScratchLMError(f"{path}: general.architecture is {architecture!r}: only 'llama' models import")
    a = architecture
    names = {t.name for t in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ScratchLMError(f"{path}: no token_embd.weight tensor")
    d_model, n_heads = (
        int(_field(reader, path, f"{a}.embedding_length")),
        int(_field(reader, path, f"{a}.attention.head_count")),
    )
    rope_dims = int(_field(reader, path, f"{a}.rope.dimension_count", d_model // n_heads))
    if rope_dims != d_model // n_heads:
        raise ScratchLMError(
            f"{path}: {a}.rope.dimension_count is {rope_dims}, the head size {d_model // n_heads}: partial RoPE "
            "is not supported"
        )
    return ModelConfig(
        vocab_size=int(embedding.shape[1]),
        context_length=int(_field(reader, path, f"{a}.context_length")),
        d_model=d_model,
        n_layers=int(_field(reader, path, f"{a}.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, path, f"{a}.attention.head_count_kv", n_heads)),
        d_ff=int(_field(reader, path, f"{a}.feed_forward_length")),
        rope_theta=float(_field(reader, path, f"{a}.rope.freq_base", 10_000.0)),
        # stored as float32: the shortest decimal that rounds to it (1e-5, not 9.99999975e-06)
        norm_eps=float(str(np.float32(_field(reader, path, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)))),
        tie_embeddings="output.weight" not in names,
    )


def model_state(gguf, reader, path: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict, every tensor dequantised to float32 in our (out_features, in_features) layout."""
    ours_of = {theirs: ours for ours, theirs in gguf_names(config).items()}
    state = {}
    for tensor in reader.tensors:
        name = ours_of.get(tensor.name)
        if name is None:
            if tensor.name == "rope_freqs.weight":
                raise ScratchLMError(f"{path}: rope_freqs.weight (scaled RoPE, as in Llama 3.1) is not supported")
            continue  # e.g. llama.cpp's precomputed rope tables: ours are computed from rope_theta
        shape = tuple(reversed([int(n) for n in tensor.shape]))  # GGUF lists dimensions innermost first
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise ScratchLMError(
                f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, which the gguf package cannot dequantise"
            ) from None
        state[name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a writable copy
    missing = sorted(set(ours_of) - {t.name for t in reader.tensors})
    if missing:
        raise ScratchLMError(f"{path}: the model lacks {len(missing)} tensors (first: {missing[0]})")
    if config.tie_embeddings:
        state["lm_head.weight"] = state["token_embeddings.weight"]
    return state


def tokenizer_from_gguf(reader, path: Path) -> Tokenizer:
    """The file's own tokenizer (byte-level BPE, `tokenizer.ggml.model = "gpt2"`)."""
    import gguf

    kind = _field(reader, path, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ScratchLMError(
            f"{path}: tokenizer.ggml.model is {kind!r}: only byte-level BPE ('gpt2') tokenizers import"
        )
    pre = _field(reader, path, "tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRETOKENIZERS:
        raise ScratchLMError(
            f"{path}: tokenizer.ggml.pre is {pre!r}: supported are {', '.join(sorted(GGUF_PRETOKENIZERS))}"
        )
    tokens = _field(reader, path, "tokenizer.ggml.tokens")
    types = _field(reader, path, "tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
    special_types = {gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED}
    vocab, specials = {}, []
    for token_id, (text, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind == gguf.TokenType.UNUSED:
            continue  # padding rows of the embedding (our own export writes them as [PADn])
        if kind in special_types:
            vocab[token_id] = text.encode()
            specials.append(text)
        else:
            vocab[token_id] = formats.string_to_token(text, f"{path}: token {token_id}")
    merges = []
    for rank, merge in enumerate(_field(reader, path, "tokenizer.ggml.merges")):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ScratchLMError(f"{path}: merge {rank} is {merge!r}: expected two tokens separated by one space")
        merges.append(tuple(formats.string_to_token(part, f"{path}: merge {rank}") for part in parts))
    eos = reader.fields.get("tokenizer.ggml.eos_token_id")
    end_token = tokens[int(eos.contents())] if eos is not None else None
    template = reader.fields.get("tokenizer.chat_template")
    return Tokenizer(
        vocab,
        merges,
        specials,
        GGUF_PRETOKENIZERS[pre],
        end_token if end_token in specials else None,
        template.contents() if template is not None else None,
    )


def read_gguf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """(model config, float32 state dict, tokenizer) of a GGUF file."""
    path = Path(path)
    gguf, reader = _reader(path)
    config = model_config(reader, path)
    return config, model_state(gguf, reader, path, config), tokenizer_from_gguf(reader, path)
