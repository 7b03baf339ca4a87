"""Generation: the KV cache against full recomputation, padding, sampling rules, stops, the CLI."""

import pytest
import torch

from scratchlm.errors import ScratchLMError
from scratchlm.infer.generate import Sampling, draw, generate, sample_next
from scratchlm.model import ModelConfig, TransformerLM


def tiny_model(**options) -> TransformerLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, context_length=32, d_model=32, n_layers=2, n_heads=4, **options)
    return TransformerLM(config).eval()


@pytest.mark.parametrize("batch", [1, 3])  # on CPU, decoding steps take DecodeWeight's split / oneDNN paths
@pytest.mark.parametrize(
    "options",
    [{}, {"n_kv_heads": 2}, {"n_kv_heads": 1, "fused_kernels": False}, {"value_embeddings": True, "unet_skips": True}],
)
@torch.no_grad()
def test_cached_decoding_equals_full_recomputation(options, batch):
    model = tiny_model(**options)
    for table in model.value_embeddings or []:
        table.weight.normal_()  # not their zeros at init
    ids = torch.randint(0, 300, (batch, 20))
    full = model(ids)
    caches = model.new_caches(batch)
    pieces = [model(ids[:, :8], caches=caches)]  # prefill 8, then one token at a time
    pieces += [model(ids[:, t : t + 1], caches=caches) for t in range(8, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)
    assert caches[0].length == 20


@torch.no_grad()
def test_left_padding_with_own_positions_equals_unpadded():
    model = tiny_model(n_kv_heads=2)
    short = torch.randint(0, 300, (1, 5))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)
    key_mask = torch.tensor([[False] * 4 + [True] * 5])
    positions = (torch.arange(9) - 4).clamp(min=0)[None, :]
    out = model(padded, positions, model.new_caches(1), key_mask)
    torch.testing.assert_close(out[:, 4:], model(short), rtol=1e-4, atol=1e-5)


class FakeTokenizer:
    """Bytes as tokens (ids 0-255), <|endoftext|> = 256: enough to exercise generate()."""

    def __init__(self) -> None:
        self.special_ids = {"<|endoftext|>": 256}
        self.end_id = 256
        self.vocab = {**{i: bytes([i]) for i in range(256)}, 256: b"<|endoftext|>"}

    def encode(self, text):
        return list(text.encode())


def test_batch_of_different_lengths_matches_one_at_a_time():
    model = tiny_model()
    prompts = ["hello there", "a", "The king is"]
    greedy = Sampling(temperature=0, max_new_tokens=10)
    together, stats = generate(model, FakeTokenizer(), prompts, greedy)
    for prompt, result in zip(prompts, together, strict=True):
        alone, _ = generate(model, FakeTokenizer(), [prompt], greedy)
        assert alone[0].token_ids == result.token_ids
    assert stats.prefill_tokens == 3 * 11 and stats.decode_tokens == 30


def test_seeded_sampling_is_reproducible_and_streams():
    model = tiny_model()
    sampling = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7)
    streamed = []
    first, _ = generate(model, FakeTokenizer(), ["abc"], sampling, on_text=lambda i, t: streamed.append(t))
    second, _ = generate(model, FakeTokenizer(), ["abc"], sampling)
    assert first[0].token_ids == second[0].token_ids and "".join(streamed) == first[0].text


def test_sampling_rules():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample_next(logits, Sampling(temperature=0), None).item() == 3
    g = torch.Generator().manual_seed(0)
    top_k = {sample_next(logits, Sampling(temperature=1.0, top_k=2, top_p=1.0), g).item() for _ in range(200)}
    assert top_k == {2, 3}
    # softmax([0,1,2,3]) = [.032, .087, .237, .644]: top_p 0.6 keeps only the top token, 0.7 the top two
    assert {sample_next(logits, Sampling(temperature=1.0, top_p=0.6), g).item() for _ in range(100)} == {3}
    assert {sample_next(logits, Sampling(temperature=1.0, top_p=0.7), g).item() for _ in range(300)} == {2, 3}


def test_draws_follow_the_probabilities_and_never_take_a_zero():
    """The inverse-CDF draw against the distribution it samples: frequencies over 40,000 draws within 1%
    (4 standard deviations of the largest: sqrt(.6 x .4 / 4e4) = 0.0024); a token of zero mass, first or
    last or in the middle, never drawn; the same seed, the same draws."""
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0]]).repeat(40_000, 1)
    drawn = draw(probs, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=6).double() / len(drawn)
    torch.testing.assert_close(frequencies, probs[0].double(), rtol=0, atol=0.01)
    assert frequencies[[0, 2, 5]].sum() == 0
    assert torch.equal(drawn, draw(probs, torch.Generator().manual_seed(0)))
    one_hot = torch.tensor([[0.0, 0.0, 1.0]]).repeat(1000, 1)  # a point mass after zeros
    assert (draw(one_hot, torch.Generator().manual_seed(1)) == 2).all()


def test_a_draw_that_rounds_up_to_the_total_takes_the_last_token_with_mass(monkeypatch):
    """u x total can round up to the total, past every cumulative sum: the last token with mass, not an
    index past the vocabulary or a trailing token of zero mass."""
    monkeypatch.setattr(torch, "rand", lambda n, _, **kw: torch.ones(n, 1, dtype=kw["dtype"]))
    probs = torch.tensor([[0.2, 0.8, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4], [0.0, 0.5, 0.0, 0.5]])
    assert draw(probs, None).tolist() == [1, 3, 3]


def test_repeated_prompts_are_prefilled_once_and_give_what_each_gives_alone(monkeypatch):
    """A GRPO group's prompts, each G times: one prefill per distinct prompt (its cache rows copied), and
    greedy continuations and texts those of the prompts alone, stop strings or not."""
    model = tiny_model(n_kv_heads=2)
    prompts = ["ab", "hello there", "ab", "ab", "hello there"]
    prefilled = []
    real_forward = TransformerLM.forward

    def spy(self, token_ids, *args, **kwargs):
        prefilled.append(token_ids.shape[0]) if token_ids.shape[1] > 1 else None
        return real_forward(self, token_ids, *args, **kwargs)

    greedy = Sampling(temperature=0, max_new_tokens=6)
    with monkeypatch.context() as patch:
        patch.setattr(TransformerLM, "forward", spy)
        together, _ = generate(model, FakeTokenizer(), prompts, greedy)
    assert prefilled == [2]
    for prompt, result in zip(prompts, together, strict=True):
        alone, _ = generate(model, FakeTokenizer(), [prompt], greedy)
        streamed, _ = generate(model, FakeTokenizer(), [prompt], greedy, on_text=lambda i, t: None)
        assert result.token_ids == alone[0].token_ids and len(result.token_ids) == 6
        assert result.text == alone[0].text == streamed[0].text  # decoded at the end or piece by piece


def test_stops_at_eot_at_stop_strings_and_at_the_limit():
    class EndsAtOnce(TransformerLM):
        def forward(self, *args, **kwargs):
            logits = super().forward(*args, **kwargs)
            logits[..., 256] = 1e4  # <|endoftext|> always wins
            return logits

    eager = EndsAtOnce(tiny_model().config).eval()
    result, _ = generate(eager, FakeTokenizer(), ["x"], Sampling(temperature=0, max_new_tokens=5))
    assert result[0].stop_reason == "eot" and result[0].token_ids == []
    model = tiny_model()
    plain, _ = generate(model, FakeTokenizer(), ["x"], Sampling(temperature=0, max_new_tokens=8))
    stop = plain[0].text[2:4]
    stopped, _ = generate(model, FakeTokenizer(), ["x"], Sampling(temperature=0, max_new_tokens=8, stop=[stop]))
    assert stopped[0].stop_reason == "stop string" and stop not in stopped[0].text
    assert plain[0].text.startswith(stopped[0].text)
    with pytest.raises(ScratchLMError, match=r"exceeds the context length 32.*at most 22 new tokens"):
        generate(model, FakeTokenizer(), ["0123456789"], Sampling(max_new_tokens=23))


def test_huggingface_export_gives_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from scratchlm.infer.export import export_huggingface

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, context_length=32, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    model = TransformerLM(config).eval()
    with torch.no_grad():  # non-trivial norm gains, so a mix-up of norms would show
        for name, p in model.named_parameters():
            if "ln" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    export_huggingface(model, tmp_path, tokenizer_dir=None)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), rtol=1e-4, atol=1e-4)


def test_export_refuses_non_llama_architectures(tmp_path):
    from scratchlm.infer.export import export_huggingface

    for options in ({"norm_position": "post"}, {"ffn": "relu2"}, {"value_embeddings": True}, {"unet_skips": True}):
        with pytest.raises(ScratchLMError, match="only the Llama architecture"):
            export_huggingface(tiny_model(**options), tmp_path, None)
