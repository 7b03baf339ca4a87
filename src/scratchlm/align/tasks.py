"""Verifiable tasks generated from seeds: multi-digit addition (the answer written most-significant
digit first) and countdown (reach a target from given numbers with + - * /).

A problem's split is a function of the problem itself (a hash of its numbers), never of the seed that
drew it, so held-out problems are disjoint from training ones however many are drawn.

Formats (byte-level, so every digit is its own token):
- a prompt: `347+125=`; the demonstration response: `<answer>472</answer>`, then `<|endoftext|>`;
- the pretraining corpus of the task model: solved problems one a line, `347+125=<answer>472</answer>`
  (no end-of-text: a base model runs on into the next problem, and learns to stop in SFT).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from scratchlm.align import rewards

HELD_OUT_PERCENT = 10  # problems whose hash falls in this percentile are held out


@dataclass(frozen=True)
class Problem:
    prompt: str  # what the model sees
    answer: str  # what the reward function checks against
    solution: str  # a correct response (the demonstration), tags included

    def solved(self) -> str:
        """The problem as a line of the pretraining corpus: prompt and solution."""
        return self.prompt + self.solution


def split_of(key: str) -> Literal["train", "test"]:
    """`test` for HELD_OUT_PERCENT% of problems, by a hash of the problem's `key` (stable across runs)."""
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "little") % 100
    return "test" if bucket < HELD_OUT_PERCENT else "train"


def addition(rng: random.Random, digits: int) -> tuple[str, Problem]:
    """a + b with a and b of 1 to `digits` digits (most of them `digits` long)."""
    a, b = (rng.randrange(10 ** (digits - 1) if rng.random() < 0.9 else 0, 10**digits) for _ in range(2))
    total = str(a + b)
    return f"{a}+{b}", Problem(f"{a}+{b}=", total, f"<answer>{total}</answer>")


def countdown(rng: random.Random, digits: int) -> tuple[str, Problem]:
    """Three or four numbers below 10**digits and a target that some expression of all of them reaches
    (the drawn expression is the demonstration). Answer: "target: n1 n2 ..." (`rewards.countdown_reward`)."""
    while True:
        numbers = [rng.randrange(1, 10**digits) for _ in range(rng.choice((3, 4)))]
        expression = str(numbers[0])
        for n in numbers[1:]:
            op = rng.choice("+-*")
            expression = (
                f"({expression}){op}{n}"
                if op == "*" and ("+" in expression or "-" in expression)
                else (f"{expression}{op}{n}")
            )
        value, _ = rewards.evaluate_arithmetic(expression)
        if value > 0 and value.denominator == 1:
            break
    given = " ".join(map(str, sorted(numbers)))
    prompt = f"{given}->{value.numerator}:"
    return f"{given}:{value.numerator}", Problem(
        prompt, f"{value.numerator}: {given}", f"<answer>{expression}</answer>"
    )


TASKS: dict[str, tuple[Callable[[random.Random, int], tuple[str, Problem]], Callable[[str, str], dict]]] = {
    "addition": (addition, rewards.answer_tag_reward),
    "countdown": (countdown, rewards.countdown_reward),
}


def problems(task: str, digits: int, split: Literal["train", "test"], seed: int | str) -> Iterator[Problem]:
    """An endless, deterministic stream of distinct-split problems of `task` drawn from `seed`."""
    make = TASKS[task][0]
    rng = random.Random(f"{task}/{digits}/{seed}")
    while True:
        key, problem = make(rng, digits)
        if split_of(key) == split:
            yield problem


def take(task: str, digits: int, split: Literal["train", "test"], seed: int | str, count: int) -> list[Problem]:
    stream = problems(task, digits, split, seed)
    return [next(stream) for _ in range(count)]


def instruction(task: str, problem: Problem) -> str:
    """The problem asked in words, for a chat model (prompt = "chat"): the same answer format."""
    if task == "addition":
        return f"What is {problem.prompt.removesuffix('=')}? Reply with only the number, inside <answer></answer> tags."
    numbers, target = problem.prompt.removesuffix(":").split("->")
    return (
        f"Using each of the numbers {numbers} exactly once, with + - * / and parentheses, write an expression "
        f"equal to {target}. Reply with only the expression, inside <answer></answer> tags."
    )


def take_for(task, tokenizer, split: Literal["train", "test"], seed: int | str, count: int) -> list[Problem]:
    """`take` for a TaskConfig: with prompt = "chat", each problem becomes a user turn of the tokenizer's
    chat template (the model's answer starts where the template opens the assistant's turn)."""
    drawn = take(task.name, task.digits, split, seed, count)
    if task.prompt == "plain":
        return drawn
    return [
        Problem(
            tokenizer.apply_chat_template([{"role": "user", "content": instruction(task.name, p)}]),
            p.answer,
            p.solution,
        )
        for p in drawn
    ]


def reward_function(task: str) -> Callable[[str, str], dict]:
    return TASKS[task][1]
