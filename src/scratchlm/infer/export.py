"""Export a trained run to the Hugging Face format: `model.safetensors` + `config.json` (LlamaForCausalLM)
+ the tokenizer's `tokenizer.json`, so a model trained here loads with
`transformers.LlamaForCausalLM.from_pretrained(dir)` and gives the same logits (tested).

RoPE convention: scratchlm rotates adjacent pairs (x[2i], x[2i+1]); Llama in `transformers` rotates
halves (x[i], x[i + d_head/2]). Reordering each head's query and key rows as [0, 2, 4, ..., 1, 3, 5, ...]
turns one into the other, and since q.k is a sum over the same pairs either way, attention is unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from scratchlm.atomic import atomic_directory, atomic_write_bytes, atomic_write_text
from scratchlm.errors import ScratchLMError
from scratchlm.model.config import ModelConfig
from scratchlm.model.transformer import TransformerLM
from scratchlm.tokenizer.bpe import TOKENIZER_FILES, Tokenizer


def _pairs_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection, per head, from interleaved pairs to halves."""
    d_out, d_in = weight.shape
    d_head = d_out // n_heads
    order = torch.cat((torch.arange(0, d_head, 2), torch.arange(1, d_head, 2)))
    return weight.view(n_heads, d_head, d_in)[:, order].reshape(d_out, d_in)


def llama_config(config: ModelConfig) -> dict:
    if (
        config.norm_position != "pre"
        or config.position_embedding != "rope"
        or config.ffn != "swiglu"
        or config.value_embeddings
        or config.unet_skips
    ):
        raise ScratchLMError(
            "only the Llama architecture exports to LlamaForCausalLM: pre-norm, RoPE and SwiGLU, no value "
            f"embeddings or U-net skips (this model has norm_position={config.norm_position}, position_embedding="
            f"{config.position_embedding}, ffn={config.ffn}, value_embeddings={config.value_embeddings}, "
            f"unet_skips={config.unet_skips})"
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.d_head,
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def llama_state_dict(model: TransformerLM) -> dict[str, torch.Tensor]:
    """Our weights under Llama's names, q/k rows reordered for its RoPE convention."""
    c = model.config
    ours = model.state_dict()
    out = {"model.embed_tokens.weight": ours["token_embeddings.weight"], "model.norm.weight": ours["ln_final.weight"]}
    if not c.tie_embeddings:
        out["lm_head.weight"] = ours["lm_head.weight"]
    for i in range(c.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "self_attn.q_proj.weight"] = _pairs_to_halves(ours[src + "attn.q_proj.weight"], c.n_heads)
        out[dst + "self_attn.k_proj.weight"] = _pairs_to_halves(ours[src + "attn.k_proj.weight"], c.n_kv_heads)
        out[dst + "self_attn.v_proj.weight"] = ours[src + "attn.v_proj.weight"]
        out[dst + "self_attn.o_proj.weight"] = ours[src + "attn.output_proj.weight"]
        out[dst + "mlp.gate_proj.weight"] = ours[src + "ffn.w1.weight"]
        out[dst + "mlp.up_proj.weight"] = ours[src + "ffn.w3.weight"]
        out[dst + "mlp.down_proj.weight"] = ours[src + "ffn.w2.weight"]
        out[dst + "input_layernorm.weight"] = ours[src + "ln1.weight"]
        out[dst + "post_attention_layernorm.weight"] = ours[src + "ln2.weight"]
    return {name: tensor.detach().contiguous().cpu() for name, tensor in out.items()}


EXPORT_FILES = ("model.safetensors", "config.json", *TOKENIZER_FILES)


def export_huggingface(
    model: TransformerLM, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None, force: bool = False
) -> Path:
    """Write model.safetensors, config.json and (if given) the tokenizer files into `out_dir`.

    `out_dir` must be new or empty; with `force` an earlier export there is replaced. The export is
    written as a unit (a temporary directory renamed into place) unless `out_dir` also holds files the
    export did not write: those are never removed, and the export's files are replaced one by one.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    config = llama_config(model.config)
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if existing and not force:
        raise ScratchLMError(
            f"{out} is not empty ({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}): "
            "give a new or empty directory, or --force to replace an earlier export there"
        )
    if tokenizer_dir is not None:
        Tokenizer.load(tokenizer_dir)  # its files agree, before anything is written
    foreign = [name for name in existing if name not in EXPORT_FILES]
    with contextlib.ExitStack() as stack:
        target = out if foreign else stack.enter_context(atomic_directory(out, EXPORT_FILES))
        staged = target / ".model.safetensors.tmp"  # safetensors writes by name: stage it, then rename
        save_file(llama_state_dict(model), str(staged), metadata={"format": "pt"})
        os.replace(staged, target / "model.safetensors")
        atomic_write_text(target / "config.json", json.dumps(config, indent=1) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:  # (tokenizer_config.json is absent from tokenizers saved before it was)
                if (Path(tokenizer_dir) / name).is_file():
                    atomic_write_bytes(target / name, (Path(tokenizer_dir) / name).read_bytes())
    return out
