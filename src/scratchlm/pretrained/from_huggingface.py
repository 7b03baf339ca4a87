"""Read a Hugging Face `LlamaForCausalLM` directory (config.json, model.safetensors or its shards,
tokenizer.json) into a `TransformerLM` and a `Tokenizer`: the reverse of `scratchlm.infer.export`.

Hugging Face's Llama rotates halves of each head (x[i], x[i + d/2]) where we rotate adjacent pairs, so
each head's query and key rows are put back from [0, 2, 4, ..., 1, 3, 5, ...] order into pairs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from scratchlm.errors import ScratchLMError
from scratchlm.model.config import ModelConfig
from scratchlm.tokenizer.bpe import Tokenizer


def halves_to_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection, per head, from halves to interleaved pairs (the
    inverse of `scratchlm.infer.export._pairs_to_halves`)."""
    d_out, d_in = weight.shape
    d_head = d_out // n_heads
    order = torch.cat((torch.arange(0, d_head, 2), torch.arange(1, d_head, 2)))
    return weight.view(n_heads, d_head, d_in)[:, torch.argsort(order)].reshape(d_out, d_in)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScratchLMError(f"{path.parent} is not a Hugging Face model directory: {path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScratchLMError(f"{path}: not a readable JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise ScratchLMError(f"{path}: expected a JSON object")
    return value


def model_config(hf: dict, path: Path) -> ModelConfig:
    """Our ModelConfig from a Llama `config.json`; what our model cannot express is refused by name."""
    if hf.get("model_type") != "llama":
        raise ScratchLMError(f"{path}: model_type is {hf.get('model_type')!r}: only 'llama' models import")
    rope = hf.get("rope_parameters") or {}  # transformers 5 keeps rope_theta there
    scaling = hf.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None)
    unsupported = {
        "attention_bias": hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
        "hidden_act": hf.get("hidden_act", "silu") != "silu" and hf.get("hidden_act"),
        "rope_scaling": scaling if scaling and scaling.get("rope_type", scaling.get("type")) != "default" else None,
    }
    for key, value in unsupported.items():
        if value:
            raise ScratchLMError(f"{path}: {key} = {value!r} is not supported (expected the plain Llama architecture)")
    try:
        d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or d_model // n_heads)
        if head_dim * n_heads != d_model:
            raise ScratchLMError(f"{path}: head_dim {head_dim} x {n_heads} heads != hidden_size {d_model}")
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            context_length=int(hf.get("max_position_embeddings", 2048)),
            d_model=d_model,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            d_ff=int(hf["intermediate_size"]),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except KeyError as exc:
        raise ScratchLMError(f"{path}: {exc.args[0]!r} is missing") from None
    except (TypeError, ValueError) as exc:
        raise ScratchLMError(f"{path}: {exc}") from None


def _safetensors_files(directory: Path) -> list[Path]:
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        return [directory / name for name in sorted(set(weight_map.values()))]
    raise ScratchLMError(f"{directory}: no model.safetensors (or model.safetensors.index.json with its shards)")


def model_state(directory: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict from the safetensors weights, float32."""
    from safetensors.torch import load_file

    theirs: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(directory):
        try:
            theirs |= load_file(str(file))
        except (OSError, RuntimeError) as exc:
            raise ScratchLMError(f"{file}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None

    def take(name: str) -> torch.Tensor:
        if name not in theirs:
            raise ScratchLMError(f"{directory}: the weights lack {name}")
        return theirs[name].float()

    c = config
    state = {"token_embeddings.weight": take("model.embed_tokens.weight"), "ln_final.weight": take("model.norm.weight")}
    state["lm_head.weight"] = state["token_embeddings.weight"] if c.tie_embeddings else take("lm_head.weight")
    for i in range(c.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        state[dst + "attn.q_proj.weight"] = halves_to_pairs(take(src + "self_attn.q_proj.weight"), c.n_heads)
        state[dst + "attn.k_proj.weight"] = halves_to_pairs(take(src + "self_attn.k_proj.weight"), c.n_kv_heads)
        state[dst + "attn.v_proj.weight"] = take(src + "self_attn.v_proj.weight")
        state[dst + "attn.output_proj.weight"] = take(src + "self_attn.o_proj.weight")
        state[dst + "ffn.w1.weight"] = take(src + "mlp.gate_proj.weight")
        state[dst + "ffn.w3.weight"] = take(src + "mlp.up_proj.weight")
        state[dst + "ffn.w2.weight"] = take(src + "mlp.down_proj.weight")
        state[dst + "ln1.weight"] = take(src + "input_layernorm.weight")
        state[dst + "ln2.weight"] = take(src + "post_attention_layernorm.weight")
    return state


def read_huggingface(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """(model config, float32 state dict, tokenizer) of a `LlamaForCausalLM` directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ScratchLMError(f"{directory}: no such directory (expected a Hugging Face model directory)")
    config = model_config(_read_json(directory / "config.json"), directory / "config.json")
    if not (directory / "tokenizer.json").is_file():
        raise ScratchLMError(f"{directory}: tokenizer.json is missing (a byte-level BPE tokenizer is needed)")
    tokenizer_config = directory / "tokenizer_config.json"
    tokenizer = Tokenizer.from_tokenizer_json(
        directory / "tokenizer.json", tokenizer_config if tokenizer_config.is_file() else None
    )
    chat_template = directory / "chat_template.jinja"  # where transformers 5 saves it
    if tokenizer.chat_template is None and chat_template.is_file():
        tokenizer.chat_template = chat_template.read_text(encoding="utf-8")
    return config, model_state(directory, config), tokenizer
