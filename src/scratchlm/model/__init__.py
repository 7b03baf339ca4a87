"""The Transformer language model, from our own modules."""

from scratchlm.model.transformer import ModelConfig, TransformerLM

__all__ = ["ModelConfig", "TransformerLM"]
