"""Alignment building blocks against written-out references and hand-computed numbers; rewards."""

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from test_generate import FakeTokenizer

from scratchlm.align import losses
from scratchlm.align.losses import (
    compute_entropy,
    compute_group_normalized_rewards,
    compute_grpo_clip_loss,
    dpo_loss,
    get_response_log_probs,
    grpo_microbatch_train_step,
    masked_mean,
    masked_normalize,
    per_instance_dpo_loss,
    sft_microbatch_train_step,
    tokenize_prompt_and_output,
)
from scratchlm.align.rewards import answer_tag_reward, countdown_reward, evaluate_arithmetic, gsm8k_reward
from scratchlm.model import ModelConfig, TransformerLM


def tiny(seed=0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(vocab_size=260, context_length=32, d_model=32, n_layers=2, n_heads=4))


def test_tokenize_prompt_and_output_masks_only_the_response():
    out = tokenize_prompt_and_output(["ab", "c"], ["cd", "de"], FakeTokenizer())
    a, b, c, d, e, pad = 97, 98, 99, 100, 101, 256
    assert out["input_ids"].tolist() == [[a, b, c], [c, d, e]]
    assert out["labels"].tolist() == [[b, c, d], [d, e, pad]]
    assert out["response_mask"].tolist() == [[False, True, True], [True, True, False]]


def test_entropy_against_torch_distributions_and_stable_at_large_scale():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 4
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(compute_entropy(logits), expected)
    big = torch.tensor([[1000.0, 1000.0, -1000.0]])
    torch.testing.assert_close(compute_entropy(big), torch.tensor([math.log(2)]))


def test_response_log_probs_in_chunks_equal_the_full_log_softmax(monkeypatch):
    monkeypatch.setattr(losses, "LOGIT_CHUNK_ROWS", 5)  # 2 x 11 rows: several chunks and a short last one
    model, ids = tiny(), torch.randint(0, 260, (2, 12))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    full = F.log_softmax(model(inputs), dim=-1)
    expected = full.gather(-1, labels[..., None]).squeeze(-1)
    out = get_response_log_probs(model, inputs, labels, return_token_entropy=True)
    torch.testing.assert_close(out["log_probs"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["token_entropy"], -(full.exp() * full).sum(-1), rtol=1e-5, atol=1e-5)
    (g_full,) = torch.autograd.grad(expected.sum(), model.lm_head.weight)
    (g_ours,) = torch.autograd.grad(out["log_probs"].sum(), model.lm_head.weight)
    torch.testing.assert_close(g_ours, g_full, rtol=1e-4, atol=1e-6)


def test_masked_mean_and_normalize_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[True, False, True], [False, False, True]])
    assert masked_mean(x, m).item() == pytest.approx(10 / 3)
    assert masked_mean(x, m, dim=1).tolist() == [2.0, 6.0]
    assert masked_normalize(x, m, 4.0).item() == 2.5
    assert masked_normalize(x, m, 2.0, dim=0).tolist() == [0.5, 0.0, 4.5]


def test_sft_gradient_accumulation_equals_one_batch():
    model, ids = tiny(), torch.randint(0, 260, (4, 10))
    mask = torch.rand(4, 9) > 0.3

    def grads(microbatches: int) -> list[torch.Tensor]:
        model.zero_grad()
        for part in torch.arange(4).chunk(microbatches):
            lp = get_response_log_probs(model, ids[part, :-1], ids[part, 1:])["log_probs"]
            sft_microbatch_train_step(lp, mask[part], microbatches, normalize_constant=3.0)
        return [p.grad.clone() for p in model.parameters()]

    for one, four in zip(grads(1), grads(4), strict=True):
        torch.testing.assert_close(four, one, rtol=1e-4, atol=1e-6)


def test_group_normalized_rewards_by_hand_and_identical_rewards_give_zero():
    rewards = {"a": 1.0, "b": 0.0, "c": 0.5}

    def reward_fn(response, truth):
        return {"reward": rewards[response], "format_reward": 1.0, "answer_reward": rewards[response]}

    adv, raw, meta = compute_group_normalized_rewards(reward_fn, ["a", "b", "c", "c"], ["x"] * 4, 2, 1e-6, False)
    assert raw.tolist() == [1.0, 0.0, 0.5, 0.5] and adv.tolist() == [0.5, -0.5, 0.0, 0.0]
    adv, _, _ = compute_group_normalized_rewards(reward_fn, ["a", "b", "c", "c"], ["x"] * 4, 2, 1e-6, True)
    std = torch.tensor([1.0, 0.0]).std().item()  # sample standard deviation of (1, 0): 1 / sqrt(2)
    assert adv[:2].tolist() == pytest.approx([0.5 / (std + 1e-6), -0.5 / (std + 1e-6)])
    assert adv[2:].tolist() == [0.0, 0.0] and meta["format_reward"] == 1.0


def test_grpo_clip_loss_by_hand():
    adv = torch.tensor([[1.0], [-1.0]])
    old = torch.zeros(2, 2)
    new = torch.log(torch.tensor([[1.5, 0.9], [1.5, 0.5]]))  # ratios
    loss, meta = compute_grpo_clip_loss(adv, new, old, cliprange=0.2)
    # A > 0: -min(r, clip(r)) -> -1.2 (clipped), -0.9; A < 0: -min(-r, -clip(r)) -> 1.5, 0.8 (clipped)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.9], [1.5, 0.8]]))
    assert meta["clipped"].tolist() == [[True, False], [False, True]]


@pytest.mark.parametrize("normalization", ["sequence_mean", "constant", "token"])
def test_grpo_length_normalizations_by_hand(normalization):
    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([[2.0], [-1.0]])
    loss, _ = grpo_microbatch_train_step(log_probs, mask, 2, "reinforce_with_baseline", advantages=adv,
                                         length_normalization=normalization, normalize_constant=4.0)  # fmt: skip
    per_token = [[2.0, 4.0], [-4.0, -5.0, -6.0]]  # -A * log p on the response tokens
    expected = {
        "sequence_mean": (sum(per_token[0]) / 2 + sum(per_token[1]) / 3) / 2,
        "constant": (sum(per_token[0]) / 4 + sum(per_token[1]) / 4) / 2,
        "token": (sum(per_token[0]) + sum(per_token[1])) / 5,
    }[normalization] / 2  # two accumulation steps
    assert loss.item() == pytest.approx(expected)
    assert log_probs.grad is not None and log_probs.grad[0, 2] == 0  # no gradient off the response


def test_dpo_loss_is_ln2_at_the_reference_and_by_hand():
    same = torch.tensor([-3.0, -7.0])
    losses_, _, _ = dpo_loss(same, same - 1, same, same - 1, beta=0.1)
    torch.testing.assert_close(losses_, torch.full((2,), math.log(2)))
    loss, _, _ = dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), 0.5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * ((-1 + 2) - (-5 + 3))))))
    policy, tokenizer = tiny(0), FakeTokenizer()
    at_reference = per_instance_dpo_loss(policy, tiny(0), tokenizer, 0.1, "2+2=", "4", "5")
    assert at_reference.item() == pytest.approx(math.log(2), abs=1e-5)
    at_reference.backward()  # the gradient raises the chosen response over the rejected one
    with torch.no_grad():
        for p in policy.parameters():
            p -= 1.0 * p.grad
    assert per_instance_dpo_loss(policy, tiny(0), tokenizer, 0.1, "2+2=", "4", "5").item() < math.log(2)


def test_rewards():
    assert answer_tag_reward("so <answer>42</answer>", "42")["reward"] == 1
    assert answer_tag_reward("so <answer>41</answer>", "42") == {"format_reward": 1, "answer_reward": 0, "reward": 0}
    assert answer_tag_reward("42", "42") == {"format_reward": 0, "answer_reward": 0, "reward": 0}
    assert countdown_reward("<answer>(6 - 4) * (3 * 1) * 4</answer>", "24: 6 4 3 1 4")["reward"] == 1
    assert countdown_reward("<answer>6 * 4</answer>", "24: 6 4 3")["reward"] == 0  # 3 unused
    assert countdown_reward("<answer>6 * 4 * 1 * 1</answer>", "24: 6 4 1")["reward"] == 0  # 1 twice
    assert countdown_reward("<answer>3 / (1 - 1)</answer>", "3: 3 1 1")["reward"] == 0  # no crash
    assert countdown_reward("<answer>__import__('os')</answer>", "1: 1")["format_reward"] == 1
    assert countdown_reward("<answer>8 / (3 - 8 / 3)</answer>", "24: 8 3 8 3")["reward"] == 1  # exact fractions
    assert evaluate_arithmetic("1/3 + 1/6") == (Fraction(1, 2), [1, 3, 1, 6])
    with pytest.raises(ValueError):
        evaluate_arithmetic("2 ** 10")
    assert gsm8k_reward("She pays 1,250 dollars... so 1,250.", "... #### 1250")["reward"] == 1
    assert gsm8k_reward("the answer is 12 not 13", "#### 12")["reward"] == 0


def test_chat_prompts_ask_the_same_problems_through_the_template():
    from scratchlm.align import tasks
    from scratchlm.align.config import TaskConfig
    from scratchlm.tokenizer.bpe import Tokenizer

    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    template += "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    chat = Tokenizer(
        {i: bytes([i]) for i in range(256)}, [], ["<|im_start|>", "<|im_end|>"], "gpt2", "<|im_end|>", template
    )
    for name in ("addition", "countdown"):
        plain = tasks.take(name, 2, "test", 0, 5)
        asked = tasks.take_for(TaskConfig(name=name, digits=2, prompt="chat"), chat, "test", 0, 5)
        assert [p.answer for p in asked] == [p.answer for p in plain]
        question = plain[0].prompt.removesuffix("=") if name == "addition" else plain[0].prompt.split("->")[1][:-1]
        assert asked[0].prompt.startswith("<|im_start|>user\n") and question in asked[0].prompt
        assert (
            asked[0].prompt.endswith("<|im_end|>\n<|im_start|>assistant\n") and "<answer></answer>" in asked[0].prompt
        )
    assert tasks.take_for(TaskConfig(digits=2), chat, "test", 0, 5) == tasks.take("addition", 2, "test", 0, 5)
