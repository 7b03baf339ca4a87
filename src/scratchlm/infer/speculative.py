"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a cheap drafter proposes k tokens, the
target model scores all of them in one forward pass, and a rejection rule keeps a prefix of them, so
each target pass yields between 1 and k + 1 tokens.

The rule (`accept_drafts`): draft token x drawn from q is kept with probability min(1, p(x) / q(x));
at the first rejection the token is drawn from the residual max(p - q, 0), renormalised; if all k are
kept, one more is drawn from the target's next distribution. Every emitted token is then distributed
exactly as the target's own sampling would draw it (tested statistically). Greedy decoding is the
limit: a draft is kept when it is the target's argmax, so the output equals greedy decoding of the
target alone.

Drafters: another scratchlm model sharing the tokenizer (`ModelDrafter`, its own KV cache), or prompt
lookup (`NgramDrafter`: the tokens that followed the latest earlier occurrence of the last n tokens;
no model at all, q a point mass). One sequence at a time.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from scratchlm.errors import ScratchLMError
from scratchlm.infer.generate import Generation, Sampling, _emit, check_fits, probabilities


@dataclass
class SpeculativeStats:
    target_passes: int = 0  # forward passes of the target after the prompt
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def accept_drafts(
    p: Tensor, q: Tensor | None, drafts: list[int], greedy: bool, generator: torch.Generator | None
) -> list[int]:
    """The tokens one round emits. p: (k + 1, vocab) the target's distributions at each draft position
    and one past; q: (k, vocab) the drafter's (None: point masses on the drafts); drafts: k tokens.
    Returns the kept drafts and one token more (a residual draw at the first rejection, else a bonus)."""
    out = []
    for i, x in enumerate(drafts):
        if greedy:
            best = int(p[i].argmax())
            if best != x:
                return [*out, best]
            out.append(x)
            continue
        qx = float(q[i, x]) if q is not None else 1.0
        u = float(torch.rand((), generator=generator))
        if u * qx < float(p[i, x]):  # u < p(x) / q(x), without dividing by a zero q
            out.append(x)
            continue
        residual = p[i].clone()
        if q is None:
            residual[x] = 0  # p - (point mass on x), clamped at 0
        else:
            residual = (residual - q[i]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q: a rejection has probability 0, but guard the rounding
            residual = p[i]
        return [*out, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))]
    last = p[len(drafts)]
    return [*out, int(last.argmax()) if greedy else int(torch.multinomial(last, 1, generator=generator))]


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (n from
    `max_n` down to 1) and propose the k tokens that followed it."""

    def __init__(self, max_n: int = 3) -> None:
        self.max_n = max_n

    def draft(self, tokens: list[int], k: int, sampling: Sampling, generator) -> tuple[list[int], Tensor | None]:
        for n in range(min(self.max_n, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start : start + n] == tail:
                    follow = tokens[start + n : start + n + k]
                    if follow:
                        return follow, None
        return [], None

    def rollback(self, length: int) -> None:
        pass


class ModelDrafter:
    """A smaller model with the same tokenizer, decoding k tokens with its own KV cache."""

    def __init__(self, model, tokenizer) -> None:
        self.model = model.eval()
        self.valid = max(tokenizer.vocab) + 1  # rows past the tokenizer's vocabulary are never drafted
        self.caches = None
        self.seen = 0  # tokens of the sequence in the draft's cache

    def draft(self, tokens: list[int], k: int, sampling: Sampling, generator) -> tuple[list[int], Tensor]:
        device = self.model.lm_head.weight.device
        if self.caches is None:
            self.caches = self.model.new_caches(1)
        k = min(k, self.model.config.context_length - len(tokens))
        if k <= 0:
            return [], None
        new = torch.tensor([tokens[self.seen :]], device=device)
        logits = self.model(new, torch.arange(self.seen, len(tokens), device=device), self.caches)[0, -1]
        self.seen = len(tokens)
        drafts, dists = [], []
        for i in range(k):
            logits[self.valid :] = float("-inf")
            dist = probabilities(logits[None], sampling)[0]
            greedy = sampling.temperature <= 0
            x = int(dist.argmax()) if greedy else int(torch.multinomial(dist, 1, generator=generator))
            drafts.append(x)
            dists.append(dist)
            if i < k - 1:
                position = torch.tensor([self.seen], device=device)
                logits = self.model(torch.tensor([[x]], device=device), position, self.caches)[0, -1]
                self.seen += 1
        return drafts, torch.stack(dists)

    def rollback(self, length: int) -> None:
        """Forget cached positions from `length` on (drafts that were not kept)."""
        self.seen = min(self.seen, length)
        for cache in self.caches or []:
            cache.length = min(cache.length, length)


@torch.no_grad()
def speculative_generate(
    model, tokenizer, prompt: str, drafter, sampling: Sampling | None = None, k: int = 4
) -> tuple[Generation, SpeculativeStats]:
    """Generate from `model` for one prompt with drafts from `drafter` (NgramDrafter or ModelDrafter)."""
    sampling = sampling or Sampling()
    if k < 1:
        raise ScratchLMError(f"k (draft tokens per round): expected at least 1, got {k}")
    model.eval()
    device = model.lm_head.weight.device
    tokens = tokenizer.encode(prompt)
    context = model.config.context_length
    check_fits(tokens, sampling.max_new_tokens, context)
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    greedy = sampling.temperature <= 0
    valid = max(tokenizer.vocab) + 1
    eot_id = tokenizer.end_id
    result, decoder = Generation(prompt), codecs.getincrementaldecoder("utf-8")(errors="replace")
    stats = SpeculativeStats()
    caches = model.new_caches(1)

    def target_dists(new: list[int], start: int) -> Tensor:
        """The target's distributions after each of `new` (fed at positions start...)."""
        ids = torch.tensor([new], device=device)
        logits = model(ids, torch.arange(start, start + len(new), device=device), caches)[0]
        if valid < logits.shape[-1]:
            logits[:, valid:] = float("-inf")
        return logits if greedy else probabilities(logits, sampling)

    begin = time.perf_counter()
    if len(tokens) > 1:  # the cache holds every token but the last, which each round feeds first
        target_dists(tokens[:-1], 0)
    produced, finished = 0, False
    while not finished:
        left = sampling.max_new_tokens - produced
        drafts, q = drafter.draft(tokens, min(k, left - 1), sampling, generator) if left > 1 else ([], None)
        p = target_dists([tokens[-1], *drafts], len(tokens) - 1)
        stats.target_passes += 1
        emitted = accept_drafts(p, q, drafts, greedy, generator)
        stats.drafted += len(drafts)
        stats.accepted += len(emitted) - 1
        for token in emitted:
            tokens.append(token)
            produced += 1
            if _emit(result, decoder, token, eot_id, tokenizer, sampling.stop, 0, None) or (
                produced >= sampling.max_new_tokens
            ):
                finished = True
                break
        for cache in caches:  # keep the positions of the sequence but its last token
            cache.length = len(tokens) - 1
        drafter.rollback(len(tokens) - 1)
    stats.tokens, stats.seconds = produced, time.perf_counter() - begin
    return result, stats
