"""The Transformer language model, from our own modules. `ModelConfig` is importable without torch."""

from scratchlm.model.config import ModelConfig

__all__ = ["ModelConfig", "TransformerLM"]


def __getattr__(name: str):
    if name == "TransformerLM":  # imported on first use, so reading a config does not load torch
        from scratchlm.model.transformer import TransformerLM

        return TransformerLM
    raise AttributeError(f"module 'scratchlm.model' has no attribute {name!r}")
