"""Decoding speed: scratchlm `generate` (KV cache) vs `transformers` `generate()` with the same weights
(exported with `scratchlm.infer.export`), greedy, 256 new tokens after a 16-token prompt, batch 1 and 8.

    python benchmarks/generate_decode.py

The model is the training issue's small shape (d_model 512, 4 layers, 16 heads, d_ff 1344, vocab 10k)
with a 512-token context, since 16 + 256 tokens do not fit the shape's 256. Both sides must produce
the same tokens (checked). Target (issue 4): >= 1.5x the peer's tokens/s.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table

PROMPT_TOKENS, NEW_TOKENS = 16, 256


class IdTokenizer:
    """Token ids as text: lets generate() run on a model with no trained tokenizer."""

    def __init__(self, vocab_size: int, prompt: list[int]) -> None:
        self.vocab = {i: b"." for i in range(vocab_size)}
        self.special_ids: dict[str, int] = {}
        self.end_id: int | None = None  # never stops early
        self.prompt = prompt

    def encode(self, text: str) -> list[int]:
        return self.prompt


def main() -> None:
    from transformers import LlamaForCausalLM

    from scratchlm.infer.export import export_huggingface
    from scratchlm.infer.generate import Sampling, generate
    from scratchlm.model import ModelConfig, TransformerLM

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=10_000, context_length=512, d_model=512, n_layers=4, n_heads=16, d_ff=1344)
    ours = TransformerLM(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_huggingface(ours, tmp, tokenizer_dir=None)
        peer = LlamaForCausalLM.from_pretrained(tmp).eval()
    prompt = torch.randint(0, config.vocab_size, (PROMPT_TOKENS,)).tolist()
    tokenizer = IdTokenizer(config.vocab_size, prompt)
    greedy = Sampling(temperature=0, max_new_tokens=NEW_TOKENS)
    rows = []
    for batch in (1, 8):

        def run_ours(batch=batch):
            results, _ = generate(ours, tokenizer, ["p"] * batch, greedy)
            return [r.token_ids for r in results]

        def run_peer(batch=batch):
            ids = torch.tensor([prompt] * batch)
            with torch.no_grad():
                out = peer.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                    use_cache=True, pad_token_id=0, eos_token_id=None)  # fmt: skip
            return out[:, PROMPT_TOKENS:].tolist()

        times = {"ours": [], "peer": []}
        outputs = {}
        for _ in range(3):  # alternate rounds; the median counts
            for name, fn in (("ours", run_ours), ("peer", run_peer)):
                start = time.perf_counter()
                outputs[name] = fn()
                times[name].append(time.perf_counter() - start)
        same = sum(a == b for a, b in zip(outputs["ours"], outputs["peer"], strict=True))
        ours_tps = batch * NEW_TOKENS / statistics.median(times["ours"])
        peer_tps = batch * NEW_TOKENS / statistics.median(times["peer"])
        rows.append([batch, f"{ours_tps:,.1f}", f"{peer_tps:,.1f}", f"{ours_tps / peer_tps:.2f}", f"{same}/{batch}"])
        print(table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
    print(f"\nmachine: {machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print(table(HEADERS, rows))


HEADERS = ["batch", "scratchlm tok/s", "transformers tok/s", "ratio", "identical outputs"]

if __name__ == "__main__":
    main()
