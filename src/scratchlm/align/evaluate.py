"""Evaluating a policy on a verifiable task: greedy pass@1, sampled pass@1 and pass@k (the unbiased
estimator of Chen et al. 2021), the answer-format rate, response lengths of correct and incorrect
answers, and the mean token entropy of the greedy responses, each rate with a 95% Wilson interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from scratchlm.align import rewards
from scratchlm.align.losses import get_response_log_probs, masked_mean
from scratchlm.align.rollout import pack_rollouts, sample_rollouts
from scratchlm.align.tasks import Problem
from scratchlm.infer.generate import Sampling


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n, c of them
    correct, is correct: 1 - C(n - c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a rate `successes` / n."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class TaskEvaluation:
    problems: int
    greedy_accuracy: float
    greedy_interval: tuple[float, float]
    format_rate: float
    mean_length_correct: float | None  # response tokens of greedy answers that were right / wrong
    mean_length_incorrect: float | None
    token_entropy: float  # nats per response token of the greedy answers
    # numeric answers: the greedy response's last number is right, tags or not (GSM8K's rule): what a
    # chat model knows before it has learned the answer format
    last_number_accuracy: float | None = None
    samples: int = 0  # per problem, for the sampled figures (0: greedy only)
    sampled_accuracy: float | None = None  # sampled pass@1
    pass_at: dict[int, float] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_task(
    model,
    tokenizer,
    problems: Sequence[Problem],
    reward_fn: Callable[[str, str], dict],
    max_new_tokens: int,
    samples: int = 0,
    ks: Sequence[int] = (1, 4, 8),
    temperature: float = 1.0,
    seed: int = 0,
    examples: int = 4,
    stop: tuple[str, ...] = (),
) -> TaskEvaluation:
    """Greedy answers to every problem (ending at the end token or at a `stop` string); with `samples` > 0
    also that many sampled answers each (pass@k for each k <= samples)."""
    was_training = model.training
    model.eval()
    prompts = [p.prompt for p in problems]
    greedy = sample_rollouts(model, tokenizer, prompts, 1, Sampling(0.0, 0, 1.0, max_new_tokens, seed, stop))
    scores = [reward_fn(r.text, p.answer) for r, p in zip(greedy, problems, strict=True)]
    correct = [s["reward"] == 1.0 for s in scores]
    lengths = [len(r.response_ids) for r in greedy]
    batch = pack_rollouts(greedy, tokenizer.end_id or 0)
    out = get_response_log_probs(model, batch["input_ids"], batch["labels"], return_token_entropy=True)
    entropy = float(masked_mean(out["token_entropy"], batch["response_mask"])) if batch["response_mask"].any() else 0.0

    def mean(values: list[int]) -> float | None:
        return sum(values) / len(values) if values else None

    result = TaskEvaluation(
        problems=len(problems),
        greedy_accuracy=sum(correct) / len(problems),
        greedy_interval=wilson_interval(sum(correct), len(problems)),
        format_rate=sum(s["format_reward"] for s in scores) / len(problems),
        mean_length_correct=mean([n for n, ok in zip(lengths, correct, strict=True) if ok]),
        mean_length_incorrect=mean([n for n, ok in zip(lengths, correct, strict=True) if not ok]),
        token_entropy=entropy,
        last_number_accuracy=None
        if not all(p.answer.isdigit() for p in problems)
        else sum(rewards.gsm8k_reward(r.text, p.answer)["reward"] for r, p in zip(greedy, problems, strict=True))
        / len(problems),
        examples=[
            {"prompt": p.prompt, "response": r.text, "correct": ok}
            for p, r, ok in zip(problems[:examples], greedy, correct, strict=False)
        ],
    )
    if samples:
        sampling = Sampling(temperature, 0, 1.0, max_new_tokens, seed + 1, stop)
        sampled = sample_rollouts(model, tokenizer, prompts, samples, sampling)
        hits = [reward_fn(r.text, problems[i // samples].answer)["reward"] == 1.0 for i, r in enumerate(sampled)]
        per_problem = [sum(hits[i * samples : (i + 1) * samples]) for i in range(len(problems))]
        result.samples = samples
        result.sampled_accuracy = sum(hits) / len(hits)
        result.pass_at = {
            k: sum(pass_at_k(samples, c, k) for c in per_problem) / len(problems) for k in ks if k <= samples
        }
    model.train(was_training)
    return result
