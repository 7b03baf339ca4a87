"""Speculative decoding: greedy output identical to the target alone for every drafter and k; the
rejection rule's output distribution equal to the target's (a chi-square test, shown to catch a wrong
rule); the n-gram drafter's lookup; stats and errors."""

import pytest
import torch
from test_generate import FakeTokenizer

from scratchlm.errors import ScratchLMError
from scratchlm.infer.generate import Sampling, generate
from scratchlm.infer.speculative import ModelDrafter, NgramDrafter, accept_drafts, speculative_generate
from scratchlm.model import ModelConfig, TransformerLM


def model(seed: int, d_model: int = 32) -> TransformerLM:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=260, context_length=96, d_model=d_model, n_layers=2, n_heads=4)
    return TransformerLM(config).eval()


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("drafter", ["ngram", "same model", "other model"])
def test_greedy_output_is_the_targets_alone(k, drafter):
    target, tokenizer = model(0), FakeTokenizer()
    drafters = {"ngram": lambda: NgramDrafter(), "same model": lambda: ModelDrafter(model(0), tokenizer),
                "other model": lambda: ModelDrafter(model(1, 16), tokenizer)}  # fmt: skip
    greedy = Sampling(temperature=0, max_new_tokens=24)
    for prompt in ["the king is the king is the", "x"]:
        [alone], _ = generate(target, tokenizer, [prompt], greedy)
        ours, stats = speculative_generate(target, tokenizer, prompt, drafters[drafter](), greedy, k=k)
        assert ours.token_ids == alone.token_ids and ours.text == alone.text and ours.stop_reason == alone.stop_reason
        assert stats.tokens == len(alone.token_ids) and stats.accepted <= stats.drafted
        assert stats.target_passes <= stats.tokens
        if drafter == "same model":  # the target drafting for itself: every draft kept
            assert stats.acceptance_rate == 1.0 and stats.target_passes <= -(-stats.tokens // (k + 1)) + 1


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


CRITICAL = 20.5  # chi-square, 4 degrees of freedom, p = 0.0004


def first_tokens(rule, p, q, trials=8000, seed=0):
    """How often each token comes first out of `rule` over trials with drafts drawn from q."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.shape[1])
    for _ in range(trials):
        drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(q.shape[0])]
        counts[rule(p, q, drafts, False, g)[0]] += 1
    return counts


def test_the_rejection_rule_emits_the_targets_distribution():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(3, 5, generator=g) * 1.5, dim=-1)  # target, k = 2 drafts + one more
    q = torch.softmax(torch.randn(2, 5, generator=g) * 1.5, dim=-1)  # a drafter that disagrees with it
    assert chi_square(first_tokens(accept_drafts, p, q), p[0]) < CRITICAL
    # prompt lookup's point-mass drafts: q = 1 on the draft
    point = torch.nn.functional.one_hot(torch.tensor([2, 4]), 5).float()

    def ngram_rule(p, q, drafts, greedy, g):
        return accept_drafts(p, None, drafts, greedy, g)

    assert chi_square(first_tokens(ngram_rule, p, point), p[0]) < CRITICAL
    # the bonus token after every draft is kept follows the next distribution
    same = p[:2]
    g2, bonus = torch.Generator().manual_seed(2), torch.zeros(5)
    for _ in range(8000):
        draft = int(torch.multinomial(same[0], 1, generator=g2))
        out = accept_drafts(p[:2], same[:1], [draft], False, g2)
        assert len(out) == 2  # p == q: never rejected
        bonus[out[1]] += 1
    assert chi_square(bonus, p[1]) < CRITICAL


def test_the_statistical_test_catches_a_wrong_rule():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(3, 5, generator=g) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(2, 5, generator=g) * 1.5, dim=-1)

    def accept_with_q_over_p(p, q, drafts, greedy, g):  # the ratio inverted
        x = drafts[0]
        if float(torch.rand((), generator=g)) < min(1.0, float(q[0, x] / p[0, x])):
            return [x]
        return [int(torch.multinomial(p[0], 1, generator=g))]

    assert chi_square(first_tokens(accept_with_q_over_p, p, q), p[0]) > 5 * CRITICAL


def test_sampled_speculative_generation_with_a_model_drafter():
    target, tokenizer = model(0), FakeTokenizer()
    sampling = Sampling(temperature=0.8, top_k=20, max_new_tokens=30, seed=3)
    a, stats = speculative_generate(target, tokenizer, "the king", ModelDrafter(model(0), tokenizer), sampling, 4)
    b, _ = speculative_generate(target, tokenizer, "the king", ModelDrafter(model(0), tokenizer), sampling, 4)
    assert a.token_ids == b.token_ids and stats.tokens == 30 == len(a.token_ids)  # seeded: reproducible
    assert stats.acceptance_rate > 0.9 and stats.target_passes <= 8  # q = p up to rounding: drafts kept
    _, other = speculative_generate(target, tokenizer, "the king", ModelDrafter(model(1, 16), tokenizer), sampling)
    assert other.tokens == 30 and other.acceptance_rate < stats.acceptance_rate


def test_ngram_drafter_proposes_what_followed_the_latest_match():
    drafter, s = NgramDrafter(max_n=3), Sampling(temperature=0)
    assert drafter.draft([1, 2, 3, 9, 8, 1, 2, 3], 4, s, None)[0] == [9, 8, 1, 2]
    assert drafter.draft([5, 1, 2, 7, 1, 2], 2, s, None)[0] == [7, 1]  # n = 2
    assert drafter.draft([4, 6, 4], 3, s, None)[0] == [6, 4]  # n = 1
    assert drafter.draft([1, 2, 3], 3, s, None)[0] == []


def test_errors():
    target, tokenizer = model(0), FakeTokenizer()
    with pytest.raises(ScratchLMError, match=r"k \(draft tokens per round\): expected at least 1, got 0"):
        speculative_generate(target, tokenizer, "a", NgramDrafter(), Sampling(), k=0)
    with pytest.raises(ScratchLMError, match="exceeds the context length 96"):
        speculative_generate(target, tokenizer, "a" * 90, NgramDrafter(), Sampling(max_new_tokens=10))
