"""Rollouts: G sampled responses per prompt with the KV-cache generator, kept as token ids (what the
policy actually sampled, so its log-probabilities are those of its own choices), and batches packed
for the log-probability pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scratchlm.infer.generate import Sampling, generate

ROLLOUT_BATCH = 256  # sequences decoded together


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]  # ends with <|endoftext|> when the model stopped by itself
    text: str  # the response, decoded (without <|endoftext|>)


def sample_rollouts(model, tokenizer, prompts: Sequence[str], group_size: int, sampling: Sampling) -> list[Rollout]:
    """`group_size` responses for each prompt, consecutive (prompt 0's group first). Deterministic for a
    given `sampling.seed`."""
    repeated = [p for p in prompts for _ in range(group_size)]
    eot = tokenizer.end_id
    out: list[Rollout] = []
    for start in range(0, len(repeated), ROLLOUT_BATCH):
        chunk = repeated[start : start + ROLLOUT_BATCH]
        seed = None if sampling.seed is None else sampling.seed + start
        generations, _ = generate(model, tokenizer, chunk, _with_seed(sampling, seed))
        for prompt, g in zip(chunk, generations, strict=True):
            ended = [eot] if g.stop_reason == "eot" and eot is not None else []
            out.append(Rollout(tokenizer.encode(prompt), g.token_ids + ended, g.text))
    return out


def _with_seed(sampling: Sampling, seed: int | None) -> Sampling:
    return Sampling(sampling.temperature, sampling.top_k, sampling.top_p, sampling.max_new_tokens, seed, sampling.stop)


def pack(prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], pad_id: int) -> dict:
    """Prompt + response ids right-padded and shifted for next-token prediction: input_ids (B, T),
    labels (B, T) and response_mask (B, T), True where the label is a response token; T = the longest
    prompt + response, minus one."""
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True))
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompt_ids), width, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        mask[i, len(p) : len(p) + len(r)] = True
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "response_mask": mask[:, 1:]}


def pack_rollouts(rollouts: Sequence[Rollout], pad_id: int) -> dict:
    return pack([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], pad_id)
