"""Standard benchmarks as a regression check on imported models (and our own): GSM8K and MMLU, read from
the MIT-licensed copies in `../shared/data/eval/` (or any folder with the same layout).

- GSM8K (grade-school math, `gsm8k/test.jsonl`: `question`, `answer` ending in `#### N`): greedy answers,
  right when their last number equals N (`rewards.gsm8k_reward`). A model with a chat template is asked
  in a user turn; a base model gets `shots` worked examples from the train split ("Question: ...
  Answer: ... The answer is N.") and stops at the next "Question:".
- MMLU (57 subjects, `mmlu/test/<subject>_test.csv`: question, four choices, the letter): the prompt of
  Hendrycks et al. ("The following are multiple choice questions (with answers) about <subject>.", the
  question, "A. ..." to "D. ...", "Answer:"), after `shots` examples from `mmlu/dev/`; the prediction is
  the letter whose token the model finds most likely next. Through the chat template the letter opens
  the assistant's turn. The first `per_subject` questions of each subject are asked.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from scratchlm.align import rewards
from scratchlm.align.evaluate import evaluate_task, wilson_interval
from scratchlm.align.tasks import Problem
from scratchlm.errors import ScratchLMError

LETTERS = "ABCD"
MMLU_BATCH = 8  # questions per forward pass


@dataclass
class BenchmarkResult:
    benchmark: str
    questions: int
    accuracy: float
    interval: tuple[float, float]  # 95% Wilson
    shots: int
    prompt: str  # "chat" (the tokenizer's template) or "plain"
    by_subject: dict[str, float] = field(default_factory=dict)  # MMLU
    examples: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScratchLMError(f"{path} not found: {what} (give --data DIR holding gsm8k/ and mmlu/)") from None
    except UnicodeDecodeError as exc:
        raise ScratchLMError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def gsm8k_items(data: Path, split: str) -> list[tuple[str, str, str]]:
    """(question, worked solution without the calculator annotations, final number) per line."""
    path = Path(data) / "gsm8k" / f"{split}.jsonl"
    items = []
    for number, line in enumerate(_read(path, "the GSM8K split").splitlines(), 1):
        try:
            row = json.loads(line)
            solution, final = row["answer"].rsplit("####", 1)
            items.append((row["question"], re.sub(r"<<[^>]*>>", "", solution).strip(), final.strip().replace(",", "")))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
            raise ScratchLMError(
                f"{path}, line {number}: expected a JSON object with question and an answer ending in '#### N'"
            ) from None
    return items


def gsm8k_problems(tokenizer, data: Path, limit: int, shots: int = 4) -> tuple[list[Problem], str]:
    """The first `limit` test problems as prompts for this tokenizer; and "chat" or "plain"."""
    test = gsm8k_items(data, "test")[:limit]
    if tokenizer.chat_template:
        ask = "{}\nWork it out step by step, then give the final answer as a number."
        chat = [tokenizer.apply_chat_template([{"role": "user", "content": ask.format(q)}]) for q, _, _ in test]
        return [Problem(p, final, "") for p, (_, _, final) in zip(chat, test, strict=True)], "chat"
    examples = "".join(
        f"Question: {q}\nAnswer: {solution} The answer is {final}.\n\n"
        for q, solution, final in gsm8k_items(data, "train")[:shots]
    )
    return [Problem(f"{examples}Question: {q}\nAnswer:", final, "") for q, _, final in test], "plain"


def evaluate_gsm8k(model, tokenizer, data: Path, limit: int = 100, shots: int = 4, max_new_tokens: int = 256):
    problems, kind = gsm8k_problems(tokenizer, data, limit, shots)
    stop = () if kind == "chat" else ("\nQuestion:",)
    result = evaluate_task(model, tokenizer, problems, rewards.gsm8k_reward, max_new_tokens, stop=stop)
    return BenchmarkResult(
        "gsm8k", result.problems, result.greedy_accuracy, result.greedy_interval, 0 if kind == "chat" else shots,
        kind, examples=[{**e, "prompt": e["prompt"][-300:]} for e in result.examples],
    )  # fmt: skip


def mmlu_items(data: Path, split: str) -> dict[str, list[tuple[str, list[str], str]]]:
    """subject -> [(question, the four choices, the answer letter)], subjects sorted."""
    folder = Path(data) / "mmlu" / split
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise ScratchLMError(f"{folder} holds no *_{split}.csv files: not the MMLU layout (mmlu/{{dev,test}}/)")
    subjects = {}
    for path in files:
        rows = []
        lines = io.StringIO(_read(path, "an MMLU subject"), newline="")  # (not splitlines: fields hold U+0085)
        for number, row in enumerate(csv.reader(lines), 1):
            if len(row) != 6 or row[5] not in LETTERS:
                raise ScratchLMError(f"{path}, row {number}: expected question, 4 choices and a letter A-D")
            rows.append((row[0], row[1:5], row[5]))
        subjects[path.name.removesuffix(f"_{split}.csv")] = rows
    return subjects


def _format(question: str, choices: list[str], answer: str | None) -> str:
    lines = [question, *(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=True))]
    return "\n".join(lines) + "\nAnswer:" + (f" {answer}\n\n" if answer else "")


def mmlu_prompt(tokenizer, subject: str, shots: list, question: str, choices: list[str]) -> str:
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    text = header + "".join(_format(q, c, a) for q, c, a in shots) + _format(question, choices, None)
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return text


def letter_ids(tokenizer, chat: bool) -> list[int]:
    """The token of each answer letter as it follows the prompt: " A" after "Answer:", or "A" opening the
    assistant's turn; a tokenizer without a one-token " A" gets the letter's own token."""
    ids = [tokenizer.encode(letter if chat else f" {letter}") for letter in LETTERS]
    if any(len(i) != 1 for i in ids):
        ids = [tokenizer.encode(letter) for letter in LETTERS]
    return [i[-1] for i in ids]


@torch.no_grad()
def evaluate_mmlu(model, tokenizer, data: Path, per_subject: int = 10, shots: int = 0) -> BenchmarkResult:
    dev = mmlu_items(data, "dev") if shots else {}
    test = mmlu_items(data, "test")
    asked = [(s, q, c, a) for s, rows in test.items() for q, c, a in rows[:per_subject]]
    chat = bool(tokenizer.chat_template)
    candidates = torch.tensor(letter_ids(tokenizer, chat))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions = []
    for start in range(0, len(asked), MMLU_BATCH):
        batch = asked[start : start + MMLU_BATCH]
        prompts = [tokenizer.encode(mmlu_prompt(tokenizer, s, dev.get(s, [])[:shots], q, c)) for s, q, c, _ in batch]
        if max(map(len, prompts)) > model.config.context_length:
            raise ScratchLMError(f"an MMLU prompt is longer than the model's context ({model.config.context_length}"
                                 " tokens): use fewer --shots")  # fmt: skip
        ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        hidden = model.hidden_states(ids.to(device))  # (B, T, d); causal, so right padding changes nothing
        last = hidden[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])]
        scores = model.lm_head(last)[:, candidates.to(device)]  # (B, 4)
        predictions += [LETTERS[i] for i in scores.argmax(-1).tolist()]
    model.train(was_training)
    right = [p == a for p, (_, _, _, a) in zip(predictions, asked, strict=True)]
    by_subject: dict[str, list[bool]] = {}
    for (subject, *_), ok in zip(asked, right, strict=True):
        by_subject.setdefault(subject, []).append(ok)
    return BenchmarkResult(
        "mmlu", len(asked), sum(right) / len(asked), wilson_interval(sum(right), len(asked)), shots,
        "chat" if chat else "plain", {s: sum(v) / len(v) for s, v in by_subject.items()},
        [{"subject": s, "question": q, "answer": a, "predicted": p}
         for (s, q, _, a), p in zip(asked[:4], predictions, strict=False)],
    )  # fmt: skip
