"""Export a trained run to GGUF, the file format of llama.cpp and the tools built on it (through the `gguf`
package that llama.cpp maintains): `llama` architecture metadata, the byte-level BPE vocabulary and merges
(`tokenizer.ggml.model = "gpt2"`), and the weights in F32, F16, Q8_0, Q4_0 or Q4_1.

Tensor names and layout are llama.cpp's: `token_embd`, `blk.N.attn_q` ... `output`; matrices are stored
(out_features, in_features) as in PyTorch. RoPE needs no reordering here: llama.cpp's `llama` rotates
adjacent pairs (x[2i], x[2i+1]) as scratchlm does (its HF converter permutes Hugging Face's halves back
into pairs; `transformers` undoes that when it loads a GGUF). Norm gains stay F32 in every file type, as
llama.cpp's converter keeps 1-D tensors; in Q8_0 / Q4_0 / Q4_1 a matrix whose rows are not a multiple of 32
falls back to F16 (they pack blocks of 32).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from scratchlm.errors import ScratchLMError
from scratchlm.infer.export import llama_config
from scratchlm.model.config import ModelConfig
from scratchlm.model.transformer import TransformerLM
from scratchlm.tokenizer import formats
from scratchlm.tokenizer.bpe import Tokenizer

FILE_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
INSTALL = 'pip install "scratchlm[export]"'


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ScratchLMError(f"GGUF export needs the gguf package: {INSTALL}") from None
    return gguf


_BLOCK_NAMES = {
    "attn.q_proj": "attn_q",
    "attn.k_proj": "attn_k",
    "attn.v_proj": "attn_v",
    "attn.output_proj": "attn_output",
    "ffn.w1": "ffn_gate",
    "ffn.w3": "ffn_up",
    "ffn.w2": "ffn_down",
    "ln1": "attn_norm",
    "ln2": "ffn_norm",
}


def gguf_names(config: ModelConfig) -> dict[str, str]:
    """Our state-dict names -> llama.cpp's tensor names."""
    names = {"token_embeddings.weight": "token_embd.weight", "ln_final.weight": "output_norm.weight"}
    if not config.tie_embeddings:  # llama.cpp ties by leaving `output` out
        names["lm_head.weight"] = "output.weight"
    for i in range(config.n_layers):
        names |= {f"layers.{i}.{ours}.weight": f"blk.{i}.{theirs}.weight" for ours, theirs in _BLOCK_NAMES.items()}
    return names


def gguf_tensors(model: TransformerLM) -> dict[str, np.ndarray]:
    """Our weights under llama.cpp's names, float32."""
    state = model.state_dict()
    return {theirs: state[ours].detach().float().cpu().numpy() for ours, theirs in gguf_names(model.config).items()}


def _tokenizer_fields(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens as GPT-2's printable strings, their types, and the merges as "left right" strings; the
    model's rows beyond the tokenizer's vocabulary (padding) become unused `[PADn]` tokens."""
    if len(tokenizer.vocab) > vocab_size:
        raise ScratchLMError(
            f"the tokenizer has {len(tokenizer.vocab)} tokens but the model only {vocab_size} embedding rows"
        )
    gguf = _gguf()
    special = set(tokenizer.special_ids.values())
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in tokenizer.vocab:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special:
            tokens.append(tokenizer.vocab[i].decode("utf-8"))
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(formats.token_to_string(tokenizer.vocab[i]))
            types.append(gguf.TokenType.NORMAL)
    merges = [f"{formats.token_to_string(a)} {formats.token_to_string(b)}" for a, b in tokenizer.merges]
    return tokens, types, merges


def export_gguf(
    model: TransformerLM,
    path: str | os.PathLike,
    tokenizer: Tokenizer | None,
    file_type: str = "f32",
    name: str = "scratchlm",
    force: bool = False,
) -> Path:
    """Write `model` (and `tokenizer`, which llama.cpp needs) as one GGUF file at `path`, atomically: the
    file appears whole or not at all. An existing file is replaced only with `force`."""
    if file_type not in FILE_TYPES:
        raise ScratchLMError(f"GGUF file type: expected one of {', '.join(FILE_TYPES)}, got {file_type!r}")
    config = llama_config(model.config)
    gguf = _gguf()
    path = Path(path)
    if path.is_dir():
        raise ScratchLMError(f"{path} is a directory: give the GGUF file's path (e.g. {path / 'model.gguf'})")
    if path.exists() and not force:
        raise ScratchLMError(f"{path} exists: give a new path, or --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    c = model.config
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.d_ff)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_dimension_count(c.d_head)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(c.vocab_size)
    kinds = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1"}
    writer.add_file_type(getattr(gguf.LlamaFileType, kinds[file_type]))
    if tokenizer is not None:
        tokens, types, merges = _tokenizer_fields(tokenizer, c.vocab_size)
        writer.add_tokenizer_model("gpt2")
        # GPT-2's pattern, or digits split one by one first ("smollm" in llama.cpp: the same rule)
        writer.add_tokenizer_pre("gpt-2" if tokenizer.pretokenizer == "gpt2" else "smollm")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        if tokenizer.end_id is not None:
            writer.add_bos_token_id(tokenizer.end_id)
            writer.add_eos_token_id(tokenizer.end_id)
            writer.add_add_bos_token(False)
        if tokenizer.chat_template is not None:
            writer.add_chat_template(tokenizer.chat_template)
    for tensor_name, data in gguf_tensors(model).items():
        qtype = gguf.GGMLQuantizationType.F32
        if data.ndim == 2 and file_type == "f16":
            qtype = gguf.GGMLQuantizationType.F16
        elif data.ndim == 2 and file_type != "f32":
            blocks = getattr(gguf.GGMLQuantizationType, file_type.upper())
            qtype = blocks if data.shape[1] % 32 == 0 else gguf.GGMLQuantizationType.F16
        writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path
