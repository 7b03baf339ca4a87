"""A paged KV cache: one pool of fixed-size blocks per layer, a block table per sequence, reference
counts, a free list, and prefix caching by hashing full blocks.

A block holds `block_size` consecutive positions of one sequence (keys and values of every layer). A
full block is identified by the hash of its tokens chained with the previous block's hash, so two
sequences with the same first n * block_size tokens share those n blocks (their keys and values are
the same: same tokens at the same positions). Shared blocks are full and never written again, so no
copy-on-write is needed; a sequence writes only into its own last, partial block.

Freed blocks keep their hash and stay findable until they are handed out again (least recently freed
first), so a system prompt survives between requests.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor

try:  # imported after torch: it shares its OpenMP threads (see model/_cpu.h)
    from scratchlm.serve import _paged
except ImportError:  # no compiler at install: decoding steps gather the blocks instead
    _paged = None


class OutOfBlocks(Exception):
    """The pool has no free block left."""


class BlockPool:
    """Block ids 0..num_blocks-1 with reference counts; k[layer], v[layer]: (num_blocks * block_size,
    n_kv_heads, d_head), position p of a block b at row b * block_size + p."""

    def __init__(self, num_blocks: int, block_size: int, n_layers: int, n_kv_heads: int, d_head: int, dtype, device):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one position, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks * block_size, n_kv_heads, d_head)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_of: dict[int, int] = {}  # block -> hash of its full contents
        self.by_hash: dict[int, int] = {}  # hash -> block
        self.prefix_hits = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        if not self.free:
            raise OutOfBlocks
        block, _ = self.free.popitem(last=False)  # the least recently freed
        old = self.hash_of.pop(block, None)
        if old is not None:
            del self.by_hash[old]
        self.refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] < 0:
                raise RuntimeError(f"block {block} released more often than taken")
            if self.refs[block] == 0:
                self.free[block] = None

    def lookup(self, block_hash: int) -> int | None:
        """The block holding these full contents, taken (reference count + 1), or None."""
        block = self.by_hash.get(block_hash)
        if block is None:
            return None
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1
        self.prefix_hits += 1
        return block

    def register(self, block: int, block_hash: int) -> None:
        """Record that `block` is full with these contents (the first block with them is the one kept)."""
        if block_hash not in self.by_hash and block not in self.hash_of:
            self.by_hash[block_hash], self.hash_of[block] = block, block_hash

    def slots(self, table: list[int], start: int, end: int) -> Tensor:
        """Pool rows of positions start..end-1 of a sequence with this block table."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.long)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size


def chain_hash(previous: int, block: list[int]) -> int:
    """The hash of a full block of tokens, chained to the hash of the blocks before it (0 for none)."""
    return hash((previous, tuple(block)))


def block_hashes(tokens: list[int], block_size: int) -> list[int]:
    """The chained hash of each full block of `tokens`."""
    out, previous = [], 0
    for i in range(len(tokens) // block_size):
        previous = chain_hash(previous, tokens[i * block_size : (i + 1) * block_size])
        out.append(previous)
    return out


class PagedLayerCache:
    """What one layer's attention sees for one forward pass, in the `KVCache` interface: `append(k, v)`
    writes the new positions of every sequence into its blocks and returns, per sequence, its cached
    keys and values (whole blocks gathered by its block table, cut at the longest cached length) followed
    by the new ones. A sequence cached for fewer positions than the longest has a gap before its new
    positions, which the pass's key_mask hides.

    rows_new: (b, n_new) pool rows of the new positions; tables: (b, blocks) block ids (padded with 0);
    cached: positions cached before this pass, of the longest sequence; lengths: (b,) keys of each
    sequence after this pass.

    A decoding step (one new position per sequence, float32 on CPU) skips the gather: `attend` runs
    `_paged.c`, which reads each sequence's keys and values where they lie in the pool."""

    paged = True  # the C decoding step reads such caches through their block tables (`model.decode_step`)

    def __init__(self, pool: BlockPool, layer: int, rows_new: Tensor, tables: Tensor, cached: int, lengths: Tensor):
        self.pool, self.layer, self.rows_new, self.tables, self.length = pool, layer, rows_new, tables, cached
        self.lengths = lengths

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, attend) -> Tensor:
        """q: (b, heads, n_new, d_head); k, v: (b, kv_heads, n_new, d_head) -> (b, heads, n_new, d_head)."""
        pk, pv = self.pool.k[self.layer], self.pool.v[self.layer]
        if _paged is None or q.shape[2] != 1 or pk.dtype != torch.float32 or pk.device.type != "cpu":
            return attend(q, *self.append(k, v), key_mask)
        b, heads, _, d = q.shape
        for new, pooled in ((k, pk), (v, pv)):
            pooled[self.rows_new.flatten()] = new.transpose(1, 2).reshape(-1, new.shape[1], d)
        q = q.reshape(b, heads, d).contiguous()
        out = torch.empty_like(q)
        _paged.decode_attention(q.data_ptr(), pk.data_ptr(), pv.data_ptr(), self.tables.data_ptr(),
                                self.lengths.data_ptr(), out.data_ptr(), b, heads, k.shape[1], d,
                                self.tables.shape[1], self.pool.block_size, int(self.lengths.max()),
                                1 / math.sqrt(d), torch.get_num_threads())  # fmt: skip
        return out.view(b, heads, 1, d)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v: (b, n_kv_heads, n_new, d_head) -> keys and values (b, n_kv_heads, cached + n_new, d_head)."""
        out = []
        for new, pooled in ((k, self.pool.k[self.layer]), (v, self.pool.v[self.layer])):
            b, heads, _, d = new.shape
            rows = new.transpose(1, 2)  # (b, n_new, heads, d)
            pooled[self.rows_new.flatten()] = rows.reshape(-1, heads, d)
            blocks = pooled.view(self.pool.num_blocks, self.pool.block_size, heads, d)[self.tables]
            old = blocks.reshape(b, -1, heads, d)[:, : self.length]
            out.append(torch.cat((old, rows), dim=1).transpose(1, 2))
        return out[0], out[1]
