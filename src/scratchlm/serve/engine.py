"""Continuous batching over a paged KV cache.

Requests (each with its own sampling parameters and seed) wait in a queue. Every `step`:

1. new requests are admitted while the batch has room (reusing cached prefix blocks of their prompt);
2. a token budget is shared out: one token for each running sequence that is decoding, then chunks of
   the prompts still being prefilled (first come, first served), so a long prompt never stalls the
   decoding ones for more than one chunk;
3. blocks are found for every scheduled position; when the pool runs out, the newest request is
   preempted (its blocks freed, its tokens so far kept) and recomputed later from its prompt + output;
4. one forward pass per prefill chunk and one batched pass for all decoding sequences, reading keys and
   values through the block tables; each finished prefill and each decode samples a token;
5. finished requests (end of text, a stop string, max_tokens, cancelled) are retired and their blocks
   released.

Greedy output is the same as `generate` for each prompt alone, whatever the arrival order, batch mix,
chunking, preemption and prefix hits (tested).
"""

from __future__ import annotations

import codecs
import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from scratchlm.errors import ScratchLMError
from scratchlm.infer.generate import Generation, Sampling, _emit, check_fits, sample_next
from scratchlm.serve.blocks import BlockPool, OutOfBlocks, PagedLayerCache, block_hashes, chain_hash


@dataclass(eq=False)  # requests are compared by identity
class Request:
    id: int
    prompt: str
    prompt_ids: list[int]
    sampling: Sampling
    generator: torch.Generator | None
    result: Generation
    decoder: codecs.IncrementalDecoder
    tokens: list[int] = field(default_factory=list)  # prompt + output so far (what the cache must hold)
    table: list[int] = field(default_factory=list)  # block ids
    computed: int = 0  # positions whose keys and values are in the blocks
    hashes: list[int] = field(default_factory=list)  # the chained hashes of its full blocks, as far as known
    finished: bool = False
    preemptions: int = 0

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    prefix_hit_tokens: int = 0


class Engine:
    """Serves `model` to many requests at once. num_blocks x block_size positions of KV cache in all;
    at most max_batch sequences running; at most token_budget tokens fed per step."""

    def __init__(self, model, tokenizer, num_blocks=256, block_size=16, max_batch=16, token_budget=256) -> None:
        if token_budget < max_batch:
            raise ScratchLMError(f"token_budget {token_budget} must be at least max_batch {max_batch}")
        self.model, self.tokenizer = model.eval(), tokenizer
        c = model.config
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        self.pool = BlockPool(num_blocks, block_size, c.n_layers, c.n_kv_heads, c.d_head, dtype, device)
        self.max_batch, self.token_budget, self.device = max_batch, token_budget, device
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}
        self.ids = itertools.count()
        self.stats = EngineStats()
        self.valid = max(tokenizer.vocab) + 1
        self.eot = tokenizer.end_id

    # --- requests
    def add_request(self, prompt: str, sampling: Sampling | None = None) -> int:
        sampling = sampling or Sampling()
        ids = self.tokenizer.encode(prompt)
        check_fits(ids, sampling.max_new_tokens, self.model.config.context_length)
        needed = -(-(len(ids) + sampling.max_new_tokens) // self.pool.block_size)
        if needed > self.pool.num_blocks:
            raise ScratchLMError(f"the request needs {needed} KV blocks, the pool has {self.pool.num_blocks}")
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        request = Request(next(self.ids), prompt, ids, sampling, generator, Generation(prompt),
                          codecs.getincrementaldecoder("utf-8")(errors="replace"), list(ids))  # fmt: skip
        self.requests[request.id] = request
        self.waiting.append(request)
        return request.id

    def cancel(self, request_id: int) -> None:
        """Stop a request now and free its blocks (a client that went away)."""
        request = self.requests.get(request_id)
        if request is not None and not request.finished:
            request.result.stop_reason = "cancelled"
            self._retire(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> dict[int, Generation]:
        while self.has_work():
            self.step()
        return {i: r.result for i, r in self.requests.items()}

    # --- one step
    @torch.no_grad()
    def step(self) -> list[tuple[int, int]]:
        """Schedule, run and sample once; returns the (request id, token) pairs produced."""
        self._admit()
        decoding = [r for r in self.running if r.computed == len(r.tokens) - 1]
        budget = self.token_budget - len(decoding)
        chunks: list[tuple[Request, int]] = []
        for r in self.running:
            if r in decoding or budget <= 0:
                continue
            n = min(len(r.tokens) - 1 - r.computed, budget)  # the last token is fed by the first decode
            if r.computed + n == len(r.tokens) - 1:
                n += 1  # a prefill that reaches the end feeds the last token too, and samples
            chunks.append((r, n))
            budget -= n
        chunks = self._reserve(chunks, decoding)
        decoding = [r for r in decoding if r in self.running]
        produced = []
        by_length: dict[int, list[Request]] = {}
        for r, n in chunks:  # prefill chunks of one length go through the model together
            by_length.setdefault(n, []).append(r)
        for n, group in by_length.items():
            logits = self._forward(group, n)
            done = [i for i, r in enumerate(group) if r.computed == len(r.tokens)]  # whole prompts: their next token
            if done:
                produced += self._sample([group[i] for i in done], logits[done])
        if decoding:
            produced += self._sample(decoding, self._forward(decoding, 1))
        self.stats.steps += 1
        return produced

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            r = self.waiting[0]
            hits = []
            usable = (len(r.tokens) - 1) // self.pool.block_size  # the last token is always computed
            for h in block_hashes(r.tokens, self.pool.block_size)[:usable]:
                block = self.pool.lookup(h)
                if block is None:
                    break
                hits.append(block)
            first_chunk = min(len(r.tokens) - len(hits) * self.pool.block_size, self.token_budget)
            needed = -(-(len(hits) * self.pool.block_size + first_chunk) // self.pool.block_size) - len(hits)
            if needed > self.pool.num_free:
                self.pool.release(hits)
                break
            self.waiting.pop(0)
            r.table, r.computed = hits, len(hits) * self.pool.block_size
            self.stats.prefix_hit_tokens += r.computed
            self.running.append(r)

    def _reserve(self, chunks: list[tuple[Request, int]], decoding: list[Request]) -> list[tuple[Request, int]]:
        """Blocks for every scheduled position, preempting the newest requests while the pool is short."""
        wanted = [(r, n) for r, n in chunks] + [(r, 1) for r in decoding]
        kept = []
        for r, n in wanted:
            while r in self.running:
                try:
                    while len(r.table) * self.pool.block_size < r.computed + n:
                        r.table.append(self.pool.allocate())
                    kept.append((r, n))
                    break
                except OutOfBlocks:
                    self._preempt(self.running[-1])
        scheduled = {id(r) for r, _ in chunks}
        return [(r, n) for r, n in kept if r in self.running and id(r) in scheduled]

    def _preempt(self, r: Request) -> None:
        self.pool.release(r.table)
        r.table, r.computed = [], 0
        r.preemptions += 1
        self.stats.preemptions += 1
        self.running.remove(r)
        self.waiting.insert(0, r)  # recomputed first when blocks free up

    def _forward(self, batch: list[Request], n_new: int) -> Tensor:
        """Feed `n_new` tokens of each sequence from its `computed` position; the last position's logits (b, V)."""
        bs = self.pool.block_size
        computed = torch.tensor([r.computed for r in batch])
        cached = int(computed.max())
        steps = torch.arange(n_new)
        positions = computed[:, None] + steps  # (b, n_new)
        used = -(-(cached + n_new) // bs)  # the blocks of the new positions too (the paged kernel reads them)
        tables = torch.tensor([r.table[:used] + [0] * (used - len(r.table[:used])) for r in batch], dtype=torch.long)
        rows_new = tables.gather(1, positions // bs) * bs + positions % bs
        lengths = computed + n_new
        ids = torch.tensor([r.tokens[r.computed : r.computed + n_new] for r in batch], device=self.device)
        caches = [
            PagedLayerCache(self.pool, i, rows_new, tables, cached, lengths) for i in range(self.model.config.n_layers)
        ]
        key_mask = None
        if bool((computed != cached).any()):  # the gap before a shorter sequence's new positions is hidden
            keys = torch.arange(cached + n_new)[None, :]
            key_mask = ((keys < computed[:, None]) | (keys >= cached)).to(self.device)
        logits = self.model(ids, positions.to(self.device), caches, key_mask)[:, -1]
        for r in batch:
            start = r.computed
            r.computed += n_new
            for i in range(start // bs, r.computed // bs):  # blocks that became full
                self.pool.register(r.table[i], self._block_hash(r, i))
        if batch[0].computed - n_new < len(batch[0].prompt_ids):
            self.stats.prefill_tokens += n_new * len(batch)
        else:
            self.stats.decode_tokens += len(batch)
        if self.valid < logits.shape[-1]:
            logits[:, self.valid :] = float("-inf")
        return logits

    def _block_hash(self, r: Request, i: int) -> int:
        """The chained hash of block i of a sequence (`block_hashes`), extending those already known."""
        bs = self.pool.block_size
        while len(r.hashes) <= i:
            j = len(r.hashes)
            r.hashes.append(chain_hash(r.hashes[-1] if j else 0, r.tokens[j * bs : (j + 1) * bs]))
        return r.hashes[i]

    def _sample(self, batch: list[Request], logits: Tensor) -> list[tuple[int, int]]:
        # greedy requests all at once (one argmax); sampled ones each with its own generator
        greedy = logits.argmax(dim=-1).tolist() if any(r.sampling.temperature <= 0 for r in batch) else None
        produced = []
        for i, (r, row) in enumerate(zip(batch, logits, strict=True)):
            if r.sampling.temperature <= 0:
                token = greedy[i]
            else:
                token = int(sample_next(row[None], r.sampling, r.generator)[0])
            r.tokens.append(token)
            produced.append((r.id, token))
            done = _emit(r.result, r.decoder, token, self.eot, self.tokenizer, r.sampling.stop, r.id, None)
            if done or r.generated >= r.sampling.max_new_tokens:
                self._retire(r)
        return produced

    def _retire(self, r: Request) -> None:
        r.finished = True
        self.pool.release(r.table)
        r.table = []
        if r in self.running:
            self.running.remove(r)
        if r in self.waiting:
            self.waiting.remove(r)
