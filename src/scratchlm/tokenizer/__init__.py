"""Byte-level BPE (training, encoding, GPT-2 / Hugging Face / tiktoken formats) and baseline tokenizers."""

from scratchlm.tokenizer.bpe import Tokenizer
from scratchlm.tokenizer.trainer import train_bpe

__all__ = ["Tokenizer", "train_bpe"]
