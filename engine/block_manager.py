"""Paged KV blocks: allocation, reference counts and the prefix cache.

A full block is known by the hash of (its parent's hash, its token ids); a hit is confirmed by comparing the
token ids, so a hash collision can never serve wrong KV. Freed blocks keep their contents and stay findable
until they are reused; the free list is ordered least-recently-used first, so the oldest are reused first.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

from engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its KV computed
    token_ids: tuple[int, ...] = ()
    parent: int | None = None  # id of the block before it in the sequence that computed it (hash set)


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self.cached: dict[int, int] = {}  # hash -> block id
        self.num_queries = 0  # prefix-cache lookups and hits, in tokens (for metrics)
        self.num_hits = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / len(self.blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of seq's full blocks, leaving at least one token to
        compute (the last token's logits are needed)."""
        if not self.enable_prefix_caching:
            return []
        hits, parent = [], None
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = block_hash(parent, tokens)
            block_id = self.cached.get(h)
            # Confirm the whole chain, not only this block's tokens: a colliding hash could otherwise serve a block
            # with the same tokens at another position or after another prefix. A parent is never reused while a
            # cached child remains (children are freed first, so they sit ahead of it in the LRU order).
            if (block_id is None or self.blocks[block_id].token_ids != tokens
                    or self.blocks[block_id].parent != (hits[-1] if hits else None)):
                break
            hits.append(block_id)
            parent = h
        return hits

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register blocks of seq that are now full and computed, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        while seq.num_hashed_blocks < num_full:
            i = seq.num_hashed_blocks
            parent = self.blocks[seq.block_table[i - 1]].hash if i else None
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            block = self.blocks[seq.block_table[i]]
            prev = seq.block_table[i - 1] if i else None
            if block.hash is None:
                h = block_hash(parent, tokens)
                twin = self.cached.get(h)
                if twin is not None and self.blocks[twin].token_ids == tokens and self.blocks[twin].parent == prev:
                    # Two requests computed the same prefix in one step: share the cached copy and drop ours, so
                    # this sequence's later blocks chain onto the cached block and stay findable.
                    self._ref(twin)
                    seq.block_table[i] = twin
                    self._unref(block)
                else:
                    block.hash, block.token_ids, block.parent = h, tokens, prev
                    self.cached.setdefault(h, block.block_id)
            seq.num_hashed_blocks += 1

    # -- allocation -----------------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int, prefix: list[int] = ()) -> bool:
        """Whether seq (holding its blocks, plus the cached prefix about to be taken) can grow by num_new_tokens."""
        have = len(seq.block_table) + len(prefix)
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - have
        taken_from_free = sum(1 for b in prefix if b in self.free)
        return need <= len(self.free) - taken_from_free

    def take_prefix(self, seq: Sequence, prefix: list[int]) -> None:
        """Give seq the cached blocks of its prefix; their tokens count as computed."""
        assert not seq.block_table
        for block_id in prefix:
            self._ref(block_id)
        seq.block_table = list(prefix)
        seq.num_hashed_blocks = len(prefix)
        seq.num_computed_tokens = len(prefix) * self.block_size
        if not seq.num_preemptions:  # report what the first schedule found, not a recompute's hits
            seq.num_cached_tokens = seq.num_computed_tokens
        self.num_queries += seq.num_tokens
        self.num_hits += seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append blocks so seq can hold num_computed_tokens + num_new_tokens (can_allocate must hold)."""
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(need):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict its old contents from the cache
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash, block.token_ids, block.parent = None, (), None
            block.ref_count = 1
            seq.block_table.append(block_id)

    def free_sequence(self, seq: Sequence) -> None:
        """Release seq's blocks; the tail first, so shared prefixes stay cached the longest."""
        for block_id in reversed(seq.block_table):
            self._unref(self.blocks[block_id])
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def _unref(self, block: Block) -> None:
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block.block_id] = None
            if block.hash is None:  # nothing worth keeping: reuse it first
                self.free.move_to_end(block.block_id, last=False)

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    # -- invariants -----------------------------------------------------------------------------------------
    def check_integrity(self, sequences: list[Sequence]) -> None:
        """Raise AssertionError if the bookkeeping disagrees with the sequences holding blocks (all of them)."""
        refs = Counter(b for seq in sequences for b in seq.block_table)
        for seq in sequences:
            assert len(set(seq.block_table)) == len(seq.block_table), f"{seq.request_id}: duplicate blocks"
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count}, held by {refs[block.block_id]}"
            )
            assert (block.ref_count == 0) == (block.block_id in self.free), f"block {block.block_id}: free list"
        for h, block_id in self.cached.items():
            assert self.blocks[block_id].hash == h, f"cache entry points at block {block_id} with another hash"
