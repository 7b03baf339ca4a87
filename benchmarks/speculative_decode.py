"""Speculative decoding against plain greedy decoding of the same run, batch 1: tokens/s, acceptance
rate, and whether the output is identical (it must be).

    python benchmarks/speculative_decode.py [--run RUN] [--draft RUN] [--tokens 200] [--k 4] [--rounds 3]
    python benchmarks/speculative_decode.py --run $SCRATCHLM_CACHE/bench-smollm2-run   # an imported model

Drafters: prompt lookup (n-gram, no model), and `--draft` (a smaller run with the same tokenizer) when
given. Prompts: pieces of the run's validation text (its tokens decoded) or, for a run without one
(an imported model), of the reference corpora in ../shared/data (Moby-Dick), so the n-gram drafter has
only what a real prompt offers. Each prompt is decoded by every system back to back, `--rounds` times;
the speed-up is the median over these (prompt, round) pairs of greedy's time over the drafter's, since
the VM's speed drifts by 20% within a minute and a pair seconds apart shares it (tok/s: medians).
Target (issue 15): >= 1.8x greedy tokens/s with identical output.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table

DEFAULT_RUN = Path("runs/curation-quality/curated/run")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN)
    parser.add_argument("--draft", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from scratchlm.infer import Sampling, generate, load_run
    from scratchlm.infer.speculative import ModelDrafter, NgramDrafter, speculative_generate

    model, tokenizer, config, _ = load_run(args.run, "cpu")
    if Path(config.data.val_tokens).is_file():
        val = np.memmap(config.data.val_tokens, dtype=np.uint16, mode="r")
    else:
        import gzip

        from common import SHARED

        with gzip.open(SHARED / "corpora" / "moby_dick.txt.gz", "rt", encoding="utf-8") as f:
            val = tokenizer.encode(f.read()[200_000:400_000])
    prompts = [tokenizer.decode([int(t) for t in val[i : i + args.prompt_tokens]]) for i in (0, 5000, 20000)]
    tokens = min(args.tokens, model.config.context_length - args.prompt_tokens - 8)
    greedy = Sampling(temperature=0, max_new_tokens=tokens)
    drafters = {"n-gram (prompt lookup)": NgramDrafter}
    if args.draft:
        draft_model = load_run(args.draft, "cpu")[0]
        drafters[f"draft model {args.draft.name}"] = lambda: ModelDrafter(draft_model, tokenizer)
    speeds: dict[str, list[float]] = {"greedy": [], **{name: [] for name in drafters}}  # tok/s, per run
    ratios: dict[str, list[float]] = {name: [] for name in drafters}  # greedy's time / the drafter's, per pair
    accepted: dict[str, list[float]] = {name: [] for name in drafters}
    same = {name: True for name in drafters}
    for _ in range(args.rounds):
        for prompt in prompts:
            start = time.perf_counter()
            [alone], _ = generate(model, tokenizer, [prompt], greedy)
            base = time.perf_counter() - start
            n = len(alone.token_ids)
            speeds["greedy"].append(n / base)
            for name, make in drafters.items():
                start = time.perf_counter()
                result, stats = speculative_generate(model, tokenizer, prompt, make(), greedy, args.k)
                seconds = time.perf_counter() - start
                speeds[name].append(n / seconds)
                ratios[name].append(base / seconds)
                accepted[name].append(stats.acceptance_rate)
                same[name] &= result.token_ids == alone.token_ids
    rows = [["greedy (target alone)", f"{statistics.median(speeds['greedy']):,.1f}", "", "1.00x", "", ""]]
    for name in drafters:
        low, high = min(ratios[name]), max(ratios[name])
        rows.append([name, f"{statistics.median(speeds[name]):,.1f}", f"{statistics.mean(accepted[name]):.0%}",
                     f"{statistics.median(ratios[name]):.2f}x", f"{low:.2f}-{high:.2f}x",
                     "yes" if same[name] else "NO"])  # fmt: skip
    print(
        f"machine: {machine()}; {args.run} ({model.num_parameters() / 1e6:.1f}M parameters), k = {args.k}, "
        f"{tokens} new tokens after {args.prompt_tokens}-token prompts, 3 prompts x {args.rounds} rounds"
    )
    print(table(["decoding", "tok/s", "drafts accepted", "vs greedy", "pairs' range", "identical output"], rows))


if __name__ == "__main__":
    main()
