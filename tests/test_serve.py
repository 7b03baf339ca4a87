"""The continuous-batching engine: each request's greedy tokens equal `generate` for its prompt alone,
whatever the arrival order, batch mix, chunking, preemption and prefix hits; the blocks are all given
back (reference counts, no leaks) after requests end or are cancelled."""

import pytest
import torch
from test_generate import FakeTokenizer

from scratchlm.errors import ScratchLMError
from scratchlm.infer.generate import Sampling, generate
from scratchlm.model import ModelConfig, TransformerLM
from scratchlm.serve.blocks import BlockPool, block_hashes
from scratchlm.serve.engine import Engine

SYSTEM = "You are a helpful assistant. Answer briefly. "  # 45 tokens: shared full blocks
PROMPTS = [SYSTEM + "What is two plus two?", "the king", SYSTEM + "Name a colour.", "x", "abcabcabcabc" * 3]


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=260, context_length=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    return TransformerLM(config).eval()


@pytest.fixture(scope="module")
def alone(model):
    greedy = Sampling(temperature=0, max_new_tokens=20)
    return [generate(model, FakeTokenizer(), [p], greedy)[0][0].token_ids for p in PROMPTS]


def assert_no_leaks(engine: Engine) -> None:
    pool = engine.pool
    assert pool.num_free == pool.num_blocks and all(r == 0 for r in pool.refs) and not engine.has_work()


@pytest.mark.parametrize(
    "options",
    [
        {},  # plenty of everything: one batch
        {"token_budget": 8, "max_batch": 2},  # prompts in chunks of a few tokens, two at a time
        {"num_blocks": 12, "block_size": 8},  # 96 positions for 5 requests: preemption and recompute
        {"num_blocks": 24, "block_size": 4, "token_budget": 6, "max_batch": 3},  # all of it at once
    ],
)
def test_greedy_tokens_equal_generate_alone_whatever_the_schedule(model, alone, options):
    engine = Engine(model, FakeTokenizer(), **{"num_blocks": 64, "block_size": 8, **options})
    greedy = Sampling(temperature=0, max_new_tokens=20)
    ids = [engine.add_request(p, greedy) for p in PROMPTS[:2]]
    for _ in range(3):  # the rest arrive while the first are decoding
        engine.step()
    ids += [engine.add_request(p, greedy) for p in PROMPTS[2:]]
    results = engine.run()
    assert [results[i].token_ids for i in ids] == alone
    assert_no_leaks(engine)
    if options.get("num_blocks") in (12, 24):
        assert engine.stats.preemptions > 0
    if not options:
        assert engine.stats.prefix_hit_tokens >= 40  # the second system-prompt request reused its blocks


def test_prefix_blocks_survive_their_request_and_are_shared_by_reference():
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=260, context_length=128, d_model=32, n_layers=1, n_heads=2)).eval()
    engine = Engine(model, FakeTokenizer(), num_blocks=32, block_size=8)
    greedy = Sampling(temperature=0, max_new_tokens=4)
    engine.add_request(SYSTEM + "one", greedy)
    engine.run()
    assert_no_leaks(engine)
    a, b = (engine.add_request(SYSTEM + q, greedy) for q in ("two", "three"))
    engine.step()  # both admitted: the system prompt's 5 full blocks from the finished request
    assert engine.stats.prefix_hit_tokens == 2 * 40
    shared = engine.requests[a].table[:5]
    assert shared == engine.requests[b].table[:5] and all(engine.pool.refs[x] == 2 for x in shared)
    engine.cancel(a)  # a client that went away: its own blocks free at once, the shared ones still held by b
    assert all(engine.pool.refs[x] == 1 for x in shared) and engine.requests[a].result.stop_reason == "cancelled"
    engine.run()
    assert_no_leaks(engine)


def test_sampled_requests_are_reproducible_by_seed_in_any_batch(model):
    sampling = [Sampling(temperature=1.0, top_k=20, max_new_tokens=12, seed=s) for s in (1, 2)]

    def run(order):
        engine = Engine(model, FakeTokenizer(), num_blocks=32, block_size=8)
        ids = {s.seed: engine.add_request("the king", s) for s in order}
        out = engine.run()
        return {seed: out[i].token_ids for seed, i in ids.items()}

    assert run(sampling) == run(sampling[::-1])


def test_greedy_and_sampled_requests_in_one_batch_each_get_their_own(model):
    """Greedy requests are sampled together (one argmax for the batch), sampled ones one by one with
    their generators: beside each other, each gives what it gives alone."""
    greedy, sampled = Sampling(temperature=0, max_new_tokens=10), Sampling(temperature=1.0, max_new_tokens=10, seed=3)

    def run(requests):
        engine = Engine(model, FakeTokenizer(), num_blocks=32, block_size=8)
        ids = [engine.add_request(prompt, s) for prompt, s in requests]
        out = engine.run()
        return [out[i].token_ids for i in ids]

    together = run([("the king", greedy), ("the king", sampled), ("a queen", greedy)])
    alone = [run([request])[0] for request in (("the king", greedy), ("the king", sampled), ("a queen", greedy))]
    assert together == alone and together[0] != together[1]


def test_block_pool_accounting():
    pool = BlockPool(3, 2, 1, 1, 4, torch.float32, "cpu")
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, 123)
    pool.release([a])
    assert pool.num_free == 2 and pool.lookup(123) == a and pool.refs[a] == 1 and pool.num_free == 1
    pool.release([a, b])
    c, d, e = pool.allocate(), pool.allocate(), pool.allocate()  # a's hash is forgotten once it is reused
    assert sorted([c, d, e]) == [0, 1, 2] and pool.lookup(123) is None
    with pytest.raises(RuntimeError, match="released more often than taken"):
        pool.release([c, c])
    assert block_hashes([1, 2, 3, 4, 5], 2) == [hash((0, (1, 2))), hash((hash((0, (1, 2))), (3, 4)))]


def test_requests_that_cannot_fit_are_refused(model):
    engine = Engine(model, FakeTokenizer(), num_blocks=4, block_size=4)
    with pytest.raises(ScratchLMError, match="needs 6 KV blocks, the pool has 4"):
        engine.add_request("hello", Sampling(max_new_tokens=19))
    with pytest.raises(ScratchLMError, match="exceeds the context length 128"):
        engine.add_request("a" * 120, Sampling(max_new_tokens=20))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_paged_decode_attention_in_c_equals_the_gathered_attention(heads, kv_heads, monkeypatch):
    from scratchlm.model.layers import CausalSelfAttention
    from scratchlm.serve import blocks

    if blocks._paged is None:
        pytest.skip("the C extension _paged is not built")
    torch.manual_seed(0)
    pool = BlockPool(16, 4, 1, kv_heads, 8, torch.float32, "cpu")
    for t in pool.k + pool.v:
        t.normal_()
    lengths = [7, 13, 1]  # cached positions before this step
    tables = [[3, 9], [0, 5, 2, 11], [6]]
    rows_new = torch.stack([pool.slots(t, n, n + 1) for t, n in zip(tables, lengths, strict=True)])
    padded = torch.zeros(3, 4, dtype=torch.long)
    for i, t in enumerate(tables):
        padded[i, : len(t)] = torch.tensor(t)
    after = torch.tensor([n + 1 for n in lengths])
    q, k, v = torch.randn(3, heads, 1, 8), torch.randn(3, kv_heads, 1, 8), torch.randn(3, kv_heads, 1, 8)
    key_mask = torch.ones(3, 14, dtype=torch.bool)
    for i, n in enumerate(lengths):
        key_mask[i, n:13] = False
    attention = CausalSelfAttention(32, heads, kv_heads, fused=True)
    ours = blocks.PagedLayerCache(pool, 0, rows_new, padded, 13, after).attend(q, k, v, key_mask, attention.attend)
    monkeypatch.setattr(blocks, "_paged", None)
    gathered = blocks.PagedLayerCache(pool, 0, rows_new, padded, 13, after).attend(q, k, v, key_mask, attention.attend)
    torch.testing.assert_close(ours, gathered, rtol=1e-5, atol=1e-5)
