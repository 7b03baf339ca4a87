"""GSM8K and MMLU as benchmarks: their files parsed as published (the real copies in ../shared/data/eval/
where present), prompts in the standard formats, MMLU's batched letter scoring against one question at a
time, and GSM8K's accuracy against the final-number rule applied to generate()'s own greedy answers."""

import csv
import json
from pathlib import Path

import pytest
import torch

from scratchlm.align import rewards
from scratchlm.align.benchmarks import (
    LETTERS,
    evaluate_gsm8k,
    evaluate_mmlu,
    gsm8k_items,
    gsm8k_problems,
    letter_ids,
    mmlu_items,
    mmlu_prompt,
)
from scratchlm.errors import ScratchLMError
from scratchlm.infer.generate import Sampling, generate
from scratchlm.model import ModelConfig, TransformerLM
from scratchlm.tokenizer import Tokenizer

SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip


def byte_tokenizer(chat: bool = False) -> Tokenizer:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], specials, chat_template=TEMPLATE if chat else None,
                     end_token="<|im_end|>" if chat else None)  # fmt: skip


def tiny_model(context: int = 2048) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(ModelConfig(vocab_size=259, context_length=context, d_model=32, n_layers=2, n_heads=4)).eval()


@pytest.fixture
def eval_data(tmp_path):
    """A small GSM8K / MMLU folder in the published layouts."""
    (tmp_path / "gsm8k").mkdir()
    rows = [("Tom has 3 apples and buys 4. How many?", "3+4=<<3+4=7>>7\n#### 7"),
            ("A box holds 1,200 pens; 200 are sold. How many are left?",
             "1,200-200=<<1200-200=1000>>1,000\n#### 1,000"),
            ("What is 6 times 7?", "6*7=<<6*7=42>>42\n#### 42")]  # fmt: skip
    for split in ("train", "test"):
        lines = [json.dumps({"question": q, "answer": a}) for q, a in rows]
        (tmp_path / "gsm8k" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    for split in ("dev", "test"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        for subject, answers in (("high_school_math", "ABCDA"), ("world_religions", "DDBCA")):
            with open(tmp_path / "mmlu" / split / f"{subject}_{split}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                for i, answer in enumerate(answers):
                    writer.writerow([f"{subject} question {i}, with a comma?", "one", "two", "three", "four", answer])
    return tmp_path


def test_gsm8k_files_and_prompts(eval_data):
    items = gsm8k_items(eval_data, "test")
    assert items[1] == ("A box holds 1,200 pens; 200 are sold. How many are left?", "1,200-200=1,000", "1000")
    plain, kind = gsm8k_problems(byte_tokenizer(), eval_data, limit=2, shots=1)
    assert kind == "plain" and [p.answer for p in plain] == ["7", "1000"]
    assert plain[1].prompt == (
        "Question: Tom has 3 apples and buys 4. How many?\nAnswer: 3+4=7 The answer is 7.\n\n"
        "Question: A box holds 1,200 pens; 200 are sold. How many are left?\nAnswer:"
    )
    chat, kind = gsm8k_problems(byte_tokenizer(chat=True), eval_data, limit=1)
    assert kind == "chat" and chat[0].prompt.startswith("<|im_start|>user\nTom has 3 apples")
    assert chat[0].prompt.endswith("as a number.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("chat", [False, True])
def test_gsm8k_accuracy_is_the_final_number_rule_on_greedy_answers(eval_data, chat):
    model, tokenizer = tiny_model(), byte_tokenizer(chat)
    result = evaluate_gsm8k(model, tokenizer, eval_data, limit=3, shots=2, max_new_tokens=12)
    problems, kind = gsm8k_problems(tokenizer, eval_data, 3, 2)
    stop = () if chat else ("\nQuestion:",)
    answers, _ = generate(model, tokenizer, [p.prompt for p in problems], Sampling(0, 0, 1, 12, 0, stop))
    expected = [rewards.gsm8k_reward(a.text, p.answer)["reward"] for a, p in zip(answers, problems, strict=True)]
    assert result.questions == 3 and result.prompt == kind and result.accuracy == sum(expected) / 3
    assert [e["response"] for e in result.examples] == [a.text for a in answers]


def test_mmlu_files_and_prompt(eval_data):
    subjects = mmlu_items(eval_data, "test")
    assert list(subjects) == ["high_school_math", "world_religions"]
    assert subjects["world_religions"][0] == ("world_religions question 0, with a comma?",
                                              ["one", "two", "three", "four"], "D")  # fmt: skip
    shots = mmlu_items(eval_data, "dev")["world_religions"][:1]
    prompt = mmlu_prompt(byte_tokenizer(), "world_religions", shots, "Which?", ["w", "x", "y", "z"])
    assert prompt == ("The following are multiple choice questions (with answers) about world religions.\n\n"
                      "world_religions question 0, with a comma?\nA. one\nB. two\nC. three\nD. four\nAnswer: D\n\n"
                      "Which?\nA. w\nB. x\nC. y\nD. z\nAnswer:")  # fmt: skip


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("shots", [0, 2])
def test_mmlu_batched_scoring_equals_one_question_at_a_time(eval_data, chat, shots):
    model, tokenizer = tiny_model(), byte_tokenizer(chat)
    result = evaluate_mmlu(model, tokenizer, eval_data, per_subject=4, shots=shots)
    letters = letter_ids(tokenizer, chat)
    dev, test = mmlu_items(eval_data, "dev"), mmlu_items(eval_data, "test")
    right = []
    for subject, rows in test.items():
        for question, choices, answer in rows[:4]:
            ids = torch.tensor([tokenizer.encode(mmlu_prompt(tokenizer, subject, dev[subject][:shots], question,
                                                             choices))])  # fmt: skip
            with torch.no_grad():
                logits = model(ids)[0, -1]
            right.append(LETTERS[int(logits[letters].argmax())] == answer)
    assert result.questions == 8 and result.accuracy == sum(right) / 8 and result.shots == shots
    assert result.by_subject == {s: sum(right[i * 4 : i * 4 + 4]) / 4 for i, s in enumerate(test)}


def test_mmlu_a_model_that_always_says_a_scores_the_share_of_a(eval_data):
    model, tokenizer = tiny_model(), byte_tokenizer()
    a = letter_ids(tokenizer, chat=False)[0]
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.lm_head.register_forward_hook(lambda module, args, out: out + 100 * torch.nn.functional.one_hot(
        torch.tensor(a), out.shape[-1]))  # fmt: skip
    result = evaluate_mmlu(model, tokenizer, eval_data, per_subject=5)
    assert result.accuracy == 3 / 10  # "ABCDA" and "DDBCA": three A's in ten


def test_bad_benchmark_files_are_named(eval_data, tmp_path):
    (eval_data / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "no final number"}\n')
    with pytest.raises(ScratchLMError, match=r"gsm8k/test.jsonl, line 1: expected a JSON object"):
        gsm8k_items(eval_data, "test")
    with open(eval_data / "mmlu" / "test" / "high_school_math_test.csv", "a") as f:
        f.write("q,a,b,c,d,E\n")
    with pytest.raises(ScratchLMError, match=r"high_school_math_test.csv, row 6: expected question, 4 choices"):
        mmlu_items(eval_data, "test")
    with pytest.raises(ScratchLMError, match="not found: the GSM8K split"):
        gsm8k_items(tmp_path / "nowhere", "test")


@pytest.mark.skipif(not SHARED_EVAL.is_dir(), reason="needs ../shared/data/eval (GSM8K and MMLU)")
def test_the_shared_copies_parse_as_published():
    assert len(gsm8k_items(SHARED_EVAL, "test")) == 1319 and len(gsm8k_items(SHARED_EVAL, "train")) == 7473
    test = mmlu_items(SHARED_EVAL, "test")
    assert len(test) == 57 and sum(map(len, test.values())) == 14042
    assert all(len(rows) == 5 for rows in mmlu_items(SHARED_EVAL, "dev").values())
