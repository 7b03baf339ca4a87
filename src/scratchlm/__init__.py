"""scratchlm: build a language model from scratch — tokenizer, model, training, inference, accounting."""

__version__ = "0.1.0"
