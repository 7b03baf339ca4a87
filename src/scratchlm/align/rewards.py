"""Verifiable rewards. Each returns {"format_reward", "answer_reward", "reward"} in [0, 1], as the
policy-gradient code expects; the reward needs the format (a formatted wrong answer earns 0, an
unformatted right one earns 0 too).

- `exact_match_reward`: the whole response, stripped, equals the answer.
- `answer_tag_reward`: the text inside the last `<answer>...</answer>` equals the answer.
- `countdown_reward`: the tagged expression uses exactly the given numbers (each once) with + - * /
  and parentheses, and evaluates exactly (fractions) to the target. Parsed with `ast`, never `eval`.
- `gsm8k_reward`: the last number of the response equals the number after GSM8K's `####`.
"""

from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from fractions import Fraction

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _scores(formatted: bool, correct: bool) -> dict[str, float]:
    return {"format_reward": float(formatted), "answer_reward": float(correct), "reward": float(formatted and correct)}


def exact_match_reward(response: str, answer: str) -> dict[str, float]:
    return _scores(True, response.strip() == answer.strip())


def tagged_answer(response: str) -> str | None:
    """The text inside the last <answer>...</answer>, stripped; None without one."""
    found = _ANSWER.findall(response)
    return found[-1].strip() if found else None


def answer_tag_reward(response: str, answer: str) -> dict[str, float]:
    inside = tagged_answer(response)
    return _scores(inside is not None, inside is not None and inside == answer.strip())


def evaluate_arithmetic(expression: str) -> tuple[Fraction, list[int]]:
    """The exact value of an expression of non-negative integers, + - * / and parentheses (unary minus
    too), and the integers it uses. Raises ValueError for anything else, or a division by zero."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an expression: {expression!r}") from exc
    numbers: list[int] = []
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return ops[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"not allowed in an arithmetic expression: {ast.dump(node)[:60]}")

    return value(tree.body), numbers


def countdown_reward(response: str, answer: str) -> dict[str, float]:
    """`answer` is "target: n1 n2 ..." (e.g. "24: 3 4 6 1"); the tagged expression must use each
    given number exactly once."""
    target_text, _, numbers_text = answer.partition(":")
    target, given = Fraction(int(target_text)), Counter(int(n) for n in numbers_text.split())
    inside = tagged_answer(response)
    if inside is None:
        return _scores(False, False)
    try:
        total, used = evaluate_arithmetic(inside)
    except ValueError:
        return _scores(True, False)
    return _scores(True, Counter(used) == given and total == target)


def last_number(text: str) -> Fraction | None:
    found = _NUMBER.findall(text)
    return Fraction(found[-1].replace(",", "")) if found else None


def gsm8k_reward(response: str, answer: str) -> dict[str, float]:
    """GSM8K's rule: the answer is the number after "####"; the response's last number must equal it."""
    truth = last_number(answer.rsplit("####", 1)[-1])
    guess = last_number(response)
    return _scores(guess is not None, guess is not None and guess == truth)
