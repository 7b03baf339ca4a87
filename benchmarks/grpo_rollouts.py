"""A GRPO step's rollouts: scratchlm's `sample_rollouts` (the KV-cache generator, 256 sequences in one
batch) vs `transformers` `generate()` with the same weights (exported with `scratchlm.infer.export`),
for the same samples: P prompts x G samples at temperature 1, `num_return_sequences=G`.

    python benchmarks/grpo_rollouts.py [--run runs/align/sft]

Without a run, a model of the align speedrun's shape (d_model 128, 4 layers, vocab 257) with random
weights. Both sides generate exactly `NEW_TOKENS` per sample (no end-of-text stop), so they do the
same work. Target (issue 18): >= 2x the peer's samples/s.

A third column: the same samples through the serving engine (`scratchlm.serve.engine`, continuous
batching over the paged cache, one request per sample, all 256 running at once), the alternative
rollouts could take.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table

PROMPTS, GROUP, NEW_TOKENS = 32, 8, 20
HEADERS = ["prompts x samples", "scratchlm samples/s", "transformers samples/s", "ratio", "engine samples/s"]


class NoStopTokenizer:
    """A byte-level tokenizer without special tokens: generation runs to max_new_tokens."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab = {i: bytes([i % 256]) for i in range(vocab_size)}
        self.special_ids: dict[str, int] = {}
        self.end_id: int | None = None  # never stops early

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def main() -> None:
    from transformers import LlamaForCausalLM

    from scratchlm.align import tasks
    from scratchlm.align.rollout import sample_rollouts
    from scratchlm.infer.export import export_huggingface
    from scratchlm.infer.generate import Sampling, load_run
    from scratchlm.model import ModelConfig, TransformerLM
    from scratchlm.serve.engine import Engine

    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=None)
    args = parser.parse_args()
    if args.run:
        ours = load_run(args.run, "cpu")[0]
    else:
        torch.manual_seed(0)
        ours = TransformerLM(ModelConfig(vocab_size=257, context_length=32, d_model=128, n_layers=4, n_heads=4))
    ours.eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_huggingface(ours, tmp, tokenizer_dir=None)
        peer = LlamaForCausalLM.from_pretrained(tmp).eval()
    tokenizer = NoStopTokenizer(ours.config.vocab_size)
    prompts = [p.prompt for p in tasks.take("addition", 2, "train", 0, PROMPTS)]
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=NEW_TOKENS, seed=0)

    def run_ours() -> int:
        return len(sample_rollouts(ours, tokenizer, prompts, GROUP, sampling))

    def run_peer() -> int:
        encoded = [tokenizer.encode(p) for p in prompts]
        width = max(map(len, encoded))
        ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])  # left-padded, as ours
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        with torch.no_grad():
            out = peer.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=GROUP,
                                use_cache=True, pad_token_id=0, eos_token_id=None)  # fmt: skip
        return out.shape[0]

    def run_engine() -> int:
        samples = PROMPTS * GROUP
        engine = Engine(ours, tokenizer, num_blocks=samples * 3, block_size=16, max_batch=samples, token_budget=4096)
        for i, prompt in enumerate(p for p in prompts for _ in range(GROUP)):
            engine.add_request(prompt, Sampling(temperature=1.0, top_p=1.0, max_new_tokens=NEW_TOKENS, seed=i))
        return len(engine.run())

    times: dict[str, list[float]] = {"ours": [], "peer": [], "engine": []}
    for _ in range(3):  # alternate rounds; the median counts
        for name, fn in (("ours", run_ours), ("peer", run_peer), ("engine", run_engine)):
            start = time.perf_counter()
            assert fn() == PROMPTS * GROUP
            times[name].append(time.perf_counter() - start)
    ours_rate = PROMPTS * GROUP / statistics.median(times["ours"])
    peer_rate = PROMPTS * GROUP / statistics.median(times["peer"])
    engine_rate = PROMPTS * GROUP / statistics.median(times["engine"])
    print(f"machine: {machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{NEW_TOKENS} new tokens per sample; {ours.num_parameters():,} parameters\n")  # fmt: skip
    print(table(HEADERS, [[f"{PROMPTS} x {GROUP}", f"{ours_rate:,.1f}", f"{peer_rate:,.1f}",
                           f"{ours_rate / peer_rate:.2f}", f"{engine_rate:,.1f}"]]))  # fmt: skip


if __name__ == "__main__":
    main()
