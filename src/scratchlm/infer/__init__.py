"""Inference: generation with a KV cache and sampling."""

from scratchlm.infer.generate import Generation, Sampling, generate, load_run

__all__ = ["Generation", "Sampling", "generate", "load_run"]
